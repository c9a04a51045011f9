"""The router's inputs it reads once at start, and the classifier artifact the operator hands it. Pure, no I/O.

The router hot-reloads its policy file, but some inputs it reads only at start: the classifier artifact (loaded
with its encoder, seconds of work) and the API keys of external tiers (environment variables, fixed for the life of
the process). `tiergate_router.restart_inputs.STARTUP_INPUTS` names them, and its policy reload refuses a change to
any of them. The operator stamps a digest of exactly those inputs (`ROUTER_INPUTS`, a unit test holds the two sets
equal) on the router's pod template, so a change to any of them rolls the router instead of being ignored.

A classifier given as a ConfigMap key is not mounted from the user's ConfigMap: the operator checks the artifact
(JSON, format, format version, its own sha256, the fields the router reads first) and copies a good one into a
ConfigMap it owns, which the router mounts. A broken or missing artifact is refused, the last good copy and the
digest stay as they were (so the router keeps serving, unchanged), and the policy says why (condition Degraded,
reason ClassifierInvalid or ClassifierMissing, and a Warning Event naming the ConfigMap and key).

A canary artifact given as a ConfigMap key (spec.router.canary.classifier.configMap) is checked and copied the same
way, into a second copy the router mounts at `naming.CANARY_MOUNT_DIR`, and its sha256 is a start-time input of its
own. Its messages name the field. Until one canary artifact was good, the generation is refused instead (the
reconcile's `canary_refusal`): nothing is applied, so a broken canary never rolls a router that waits for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tiergate.api import naming
from tiergate.api.policy import RoutingPolicy

# The format's standard-library half (the operator image has no numpy): one definition of what the router loads.
from tiergate.routing.format import FORMAT, FORMAT_VERSION, KINDS, MAX_BYTES, digest
from tiergate.routing.tiers import PRICE_WAY_OUT, artifact_tier, price_factor, price_mismatch

# On the router's pod template: changes exactly when an input the router reads only at start changes.
ROUTER_INPUTS_ANNOTATION = "tiergate.io/router-inputs-digest"
# On the copy: the artifact's own sha256, what the router reports as tiergate_router_classifier_info{sha256}.
CLASSIFIER_SHA_ANNOTATION = "tiergate.io/classifier-sha256"
# The key of the artifact in the operator's copy; the router pod mounts it under the key the policy names.
COPY_KEY = "artifact.json"

# The names of the router's start-time inputs, as `tiergate_router.restart_inputs.STARTUP_INPUTS` spells them.
CLASSIFIER_REF = "spec.router.classifier"
API_KEY_REFS = "spec.tiers[].endpoint.apiKeySecretRef"
CLASSIFIER_ARTIFACT = "classifier artifact"
CANARY_REF = "spec.router.canary.classifier"
CANARY_ARTIFACT = "canary classifier artifact"
ROUTER_INPUTS = frozenset({CLASSIFIER_REF, API_KEY_REFS, CLASSIFIER_ARTIFACT, CANARY_REF, CANARY_ARTIFACT})
# The field a canary ConfigMap's problems name.
CANARY_CONFIGMAP = f"{CANARY_REF}.configMap"

MISSING = "ClassifierMissing"
INVALID = "ClassifierInvalid"

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class ClassifierCopy:
    """A checked artifact: what the operator's copy holds and the router mounts."""

    content: str
    sha256: str  # the artifact's own `sha256` field (a digest of its canonical JSON)
    source: str  # "ConfigMap NS/NAME key KEY", for messages


@dataclass(frozen=True)
class ClassifierProblem:
    """Why the artifact the policy names is not served; reason is MISSING or INVALID."""

    reason: str
    message: str


def copy_name(policy: RoutingPolicy) -> str:
    """The operator-owned ConfigMap holding the last good artifact (next to the router's `-router` ConfigMap)."""
    return f"{naming.router_name(policy.name)}-classifier"


def canary_copy_name(policy: RoutingPolicy) -> str:
    """The operator-owned ConfigMap holding the last good canary artifact."""
    return f"{naming.router_name(policy.name)}-canary-classifier"


def _own_names(policy: RoutingPolicy) -> tuple[str, ...]:
    return copy_name(policy), canary_copy_name(policy), naming.router_name(policy.name)


def source_ref(policy: RoutingPolicy) -> tuple[str, str] | None:
    """(ConfigMap name, key) of the classifier the policy names, None when it names none or a path."""
    c = policy.spec.router.classifier
    if c is None or c.config_map is None:
        return None
    return c.config_map.name, c.config_map.key


def canary_source_ref(policy: RoutingPolicy) -> tuple[str, str] | None:
    """(ConfigMap name, key) of the canary artifact, None without a canary or when it is a path."""
    c = policy.spec.router.canary
    if c is None or c.classifier.config_map is None:
        return None
    return c.classifier.config_map.name, c.classifier.config_map.key


def source_of(body: Obj) -> str | None:
    """The classifier ConfigMap's name from a raw policy body (no validation: used to route watch events)."""
    router = ((body.get("spec") or {}).get("router")) or {}
    cm = (router.get("classifier") or {}).get("configMap") or {}
    name = cm.get("name")
    return name if isinstance(name, str) and name else None


def canary_source_of(body: Obj) -> str | None:
    """The canary artifact's ConfigMap name from a raw policy body (no validation), as `source_of`."""
    router = ((body.get("spec") or {}).get("router")) or {}
    canary = router.get("canary") or {}
    cm = ((canary.get("classifier") or {}) if isinstance(canary, Mapping) else {}).get("configMap") or {}
    name = cm.get("name") if isinstance(cm, Mapping) else None
    return name if isinstance(name, str) and name else None


def check_artifact(text: str, where: str) -> str:
    """The artifact's sha256 when `text` is one the router can load as far as its header says; ValueError naming
    what is wrong. Deliberately the checks `tiergate.routing.artifact.loads` makes first, without numpy: JSON, format,
    version, the checksum over the canonical JSON (so any edit or truncation is caught), kind, encoder and head.
    The tensors' shapes are the router's to check; a trained artifact with a matching checksum has them right."""
    return str(_checked(text, where)["sha256"])


def _checked(text: str, where: str) -> dict[str, Any]:
    """`text` parsed, after `check_artifact`'s checks."""
    if len(text.encode("utf-8")) > MAX_BYTES:
        raise ValueError(f"{where}: {len(text)} bytes, more than a router artifact may hold ({MAX_BYTES})")
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{where}: not a router artifact (format is not {FORMAT!r})")
    version = doc.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ValueError(f"{where}: format version {version!r}, this tiergate reads {FORMAT_VERSION}")
    if doc.get("sha256") != digest(doc):
        raise ValueError(f"{where}: checksum mismatch (sha256), the artifact is corrupt or was edited by hand")
    if doc.get("kind") not in KINDS:
        raise ValueError(f"{where}: kind {doc.get('kind')!r} is not one of {', '.join(KINDS)}")
    enc = doc.get("encoder")
    if not isinstance(enc, dict) or not enc.get("id") or not isinstance(enc.get("dim"), int):
        raise ValueError(f"{where}: no usable encoder (id, dim)")
    members = (doc.get("head") or {}).get("members") if isinstance(doc.get("head"), dict) else None
    if not isinstance(members, list) or not members:
        raise ValueError(f"{where}: no head members")
    return doc


# The router's shipped default artifact, used when a policy names no classifier, is a two-tier one.
DEFAULT_KIND = "two_tier"


def two_tier_overflow(policy: RoutingPolicy, kind: str, where: str) -> str | None:
    """Why a `kind` artifact cannot serve the policy's tiers as written, or None. A two-tier artifact's one score
    separates the cheapest tier from the strongest only: the tiers between would never be chosen, and the router
    refuses such a policy (`tiergate_router.config.knobs.two_tier_thresholds`), so the operator says so first."""
    tiers = policy.spec.tiers
    if kind != "two_tier" or len(tiers) <= 2:
        return None
    between = ", ".join(t.name for t in tiers[1:-1])
    return (
        f"{len(tiers)} tiers, but {where} is a two-tier artifact (one score: the cheapest or the strongest tier), so "
        f"{between} would never be chosen; serve two tiers, or name an N-tier artifact in spec.router.classifier"
    )


# The decision knobs (API names) that act on a two-tier artifact's score; the others choose among N tiers. As
# `tiergate_router.config.knobs.TWO_TIER_KNOBS` (a unit test holds the two equal).
TWO_TIER_KNOBS = ("thresholdBasisPoints", "targetStrongShareBasisPoints")


def artifact_misfit(policy: RoutingPolicy, doc: Mapping[str, Any], where: str) -> str | None:
    """Why the router would refuse this policy with this artifact (`doc`, checked), naming the field; None when it
    would serve it. The router's rules (`tiergate_router.config`), checked where the operator can see them, so
    that the policy says so instead of a router pod crash-looping on start: per-user profiles (personalization)
    without an N-tier artifact; a knob of the other artifact kind;
    more than two tiers under a two-tier artifact; for an N-tier one, a tier it does not know or two tiers on one
    (`tiergate.routing.tiers.artifact_tier`), and without a cost weight, prices its calibration does not describe
    (`price_factor`). Not checked: whether a budget is affordable (the router says so; the last good policy keeps
    serving on a reload)."""
    kind = str(doc.get("kind"))
    knob = next(iter(policy.spec.router.decision_knobs()), None)
    p = policy.spec.router.personalization
    if p is not None and p.enabled and kind != "multi_tier":
        return f"spec.router.personalization.enabled: needs an N-tier artifact, but {where} is a {kind} artifact"
    if kind == "two_tier":
        if knob is not None and knob not in TWO_TIER_KNOBS:
            return f"spec.router.{knob}: an N-tier knob, but {where} is a two-tier artifact (set thresholdBasisPoints)"
        overflow = two_tier_overflow(policy, kind, where)
        return None if overflow is None else f"spec.tiers: {overflow}"
    if knob in TWO_TIER_KNOBS:
        return f"spec.router.{knob}: a two-tier knob, but {where} is an N-tier artifact (set costWeightBasisPoints)"
    if kind == "candidates":
        return _candidates_misfit(policy, doc, where, knob)
    try:
        known = [str(t["name"]) for t in doc["tiers"]]
        art_prices = [float(t["price"]) for t in doc["tiers"]]
    except (KeyError, TypeError, ValueError):
        return f"{where}: its tiers are not a list of {{name, price}}"
    columns: list[int] = []
    for i, t in enumerate(policy.spec.tiers):
        col = artifact_tier((t.name, t.model_name, t.model), known)
        if col is None:
            return f"spec.tiers[{i}] ({t.name}): matches no tier of {where} by name, servedModelName or model"
        if col in columns:
            return f"spec.tiers[{i}] ({t.name}): maps to artifact tier {known[col]!r}, as another tier does"
        columns.append(col)
    if policy.spec.router.cost_weight_basis_points is not None:
        return None
    mine = [float(t.price.input_per_million) + float(t.price.output_per_million) for t in policy.spec.tiers]
    k, off = price_factor(mine, [art_prices[c] for c in columns])
    if off < 0:
        return None
    need = "spec.router.budgetPerMillion" if knob == "budgetPerMillion" else "the artifact's default cost weight"
    off_by = price_mismatch(mine[off], k, off == 0, art_prices[columns[off]], known[columns[off]])
    return (
        f"spec.tiers[{off}].price: {off_by}; the calibration of {where}, measured at its own prices, does not "
        f"describe these, and {need} comes from it. {PRICE_WAY_OUT}"
    )


def _candidates_misfit(policy: RoutingPolicy, doc: Mapping[str, Any], where: str, knob: str | None) -> str | None:
    """`artifact_misfit` for a `candidates` (BEST-Route) artifact, the router's rules
    (`tiergate_router.config.knobs.candidate_routing_for`): a price budget per million tokens means nothing to a
    table in USD per 1k prompts; some tier must serve a candidate's model (by name, servedModelName or model); and
    without a cost weight, the priced tiers' input and output prices must be the artifact's up to one factor."""
    if knob == "budgetPerMillion":
        return (
            f"spec.router.budgetPerMillion: a price per million tokens, but {where} is a candidates artifact, "
            "calibrated in USD per 1k prompts (set costWeightBasisPoints, or `tiergate calibrate "
            "--usd-per-1k-prompts B --write OUT`)"
        )
    try:
        cands = [
            (str(t["model"]), float(t["input_usd_per_mtok"]), float(t["output_usd_per_mtok"])) for t in doc["tiers"]
        ]
    except (KeyError, TypeError, ValueError):
        return f"{where}: its candidates are not a list of {{model, input_usd_per_mtok, output_usd_per_mtok}}"
    served: list[tuple[int, float, float]] = []
    for model, pin, pout in cands:
        i = next((i for i, t in enumerate(policy.spec.tiers) if model in (t.name, t.model_name, t.model)), None)
        if i is not None:
            served.append((i, pin, pout))
    if not served:
        models = ", ".join(dict.fromkeys(m for m, _, _ in cands))
        return f"spec.tiers: no tier serves a model of {where} (its models: {models}) by name, servedModelName or model"
    if policy.spec.router.cost_weight_basis_points is not None:
        return None
    tiers = policy.spec.tiers
    mine = [
        float(p) for i, _, _ in served for p in (tiers[i].price.input_per_million, tiers[i].price.output_per_million)
    ]
    theirs = [p for _, pin, pout in served for p in (pin, pout)]
    _, off = price_factor(mine, theirs)
    if off < 0:
        return None
    i = served[off // 2][0]
    side = ("input", "output")[off % 2]
    return (
        f"spec.tiers[{i}].price: its {side} price {mine[off]:g} is not {where}'s {theirs[off]:g} for the model (nor "
        f"the same multiple as the other prices); the artifact's calibrated cost weight does not describe these. "
        f"{PRICE_WAY_OUT}"
    )


def _key_text(cm: Obj, key: str) -> str | None:
    text = (cm.get("data") or {}).get(key)
    if isinstance(text, str):
        return text
    raw = (cm.get("binaryData") or {}).get(key)
    if not isinstance(raw, str):
        return None
    try:
        return base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "\ufffd"  # not UTF-8 text: check_artifact reports it as not JSON


def read_source(policy: RoutingPolicy, cm: Obj | None) -> ClassifierCopy | ClassifierProblem | None:
    """The user's classifier ConfigMap (None: absent) checked: a copy to serve, or why not. None when the policy
    names no classifier ConfigMap."""
    ref = source_ref(policy)
    return None if ref is None else _read_source(policy, cm, ref)


def read_canary_source(policy: RoutingPolicy, cm: Obj | None) -> ClassifierCopy | ClassifierProblem | None:
    """`read_source` for the canary artifact's ConfigMap; the problems name spec.router.canary.classifier.configMap.
    The canary must fit the policy as the primary must (the router refuses it otherwise)."""
    ref = canary_source_ref(policy)
    if ref is None:
        return None
    found = _read_source(policy, cm, ref)
    if isinstance(found, ClassifierProblem):
        return ClassifierProblem(found.reason, f"{CANARY_CONFIGMAP}: {found.message}")
    return found


def _read_source(policy: RoutingPolicy, cm: Obj | None, ref: tuple[str, str]) -> ClassifierCopy | ClassifierProblem:
    name, key = ref
    where = f"ConfigMap {policy.namespace}/{name} key {key}"
    if name in _own_names(policy):
        # The operator writes those: reading one as the source would make the last good copy its own source.
        return ClassifierProblem(INVALID, f"{where}: that name belongs to the operator's own ConfigMap; rename it")
    if cm is None:
        return ClassifierProblem(MISSING, f"{where}: the ConfigMap does not exist")
    text = _key_text(cm, key)
    if text is None:
        keys = sorted({*(cm.get("data") or {}), *(cm.get("binaryData") or {})})
        return ClassifierProblem(MISSING, f"{where}: no such key (keys: {', '.join(keys) or 'none'})")
    try:
        doc = _checked(text, where)
    except ValueError as e:
        return ClassifierProblem(INVALID, str(e))
    misfit = artifact_misfit(policy, doc, where)
    if misfit is not None:
        return ClassifierProblem(INVALID, misfit)
    return ClassifierCopy(text, str(doc["sha256"]), where)


def read_copy(cm: Obj | None) -> ClassifierCopy | None:
    """The last good artifact from the operator's copy (after a restart, when memory has none); None if absent or
    (edited by hand since) no longer good."""
    if cm is None:
        return None
    text = _key_text(cm, COPY_KEY)
    if text is None:
        return None
    md = cm.get("metadata") or {}
    where = f"ConfigMap {md.get('namespace')}/{md.get('name')} key {COPY_KEY}"
    try:
        return ClassifierCopy(text, check_artifact(text, where), where)
    except ValueError:
        return None


def router_inputs(
    policy: RoutingPolicy, classifier: ClassifierCopy | None, canary: ClassifierCopy | None = None
) -> dict[str, Any]:
    """Every input the router reads only at start, by the name the router gives it (ROUTER_INPUTS). `canary`: the
    canary ConfigMap's checked artifact (the last good one)."""
    c = policy.spec.router.classifier
    second = policy.spec.router.canary
    keys = {}
    for t in policy.spec.tiers:
        ref = t.endpoint.api_key_secret_ref if t.endpoint is not None else None
        if ref is not None:
            keys[t.name] = [ref.name, ref.key]
    return {
        CLASSIFIER_REF: c.model_dump(mode="json", by_alias=True, exclude_none=True) if c is not None else None,
        API_KEY_REFS: keys,
        CLASSIFIER_ARTIFACT: classifier.sha256 if classifier is not None else None,
        # The share is hot-reloaded; which artifact the canary is, is read at start.
        CANARY_REF: second.classifier.model_dump(mode="json", by_alias=True, exclude_none=True) if second else None,
        CANARY_ARTIFACT: canary.sha256 if canary is not None else None,
    }


def router_inputs_digest(
    policy: RoutingPolicy, classifier: ClassifierCopy | None, canary: ClassifierCopy | None = None
) -> str:
    canon = json.dumps(router_inputs(policy, classifier, canary), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]
