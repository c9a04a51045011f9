"""The versioned router artifact: one JSON file, small enough for a Kubernetes ConfigMap.

Contract (the router service and the operator depend on it; bump `FORMAT_VERSION` on any incompatible change):

    {
      "format": "tiergate.router",            # constant, identifies the file type
      "format_version": 1,
      "encoder": {"id": "sentence-transformers/all-MiniLM-L6-v2", "dim": 384, "max_tokens": 256,
                  "pooling": "mean", "normalize": true},
      "kind": "two_tier" | "multi_tier" | "candidates",
      "label_mode": "deterministic" | "probabilistic" | "transformed" | "difference" | "quality",
      "label_margin": float | null,           # Hybrid LLM's t for "transformed", chosen from the data
      "features": [{"name": "log_chars", "mean": float, "std": float}],   # prompt features (features.py)
      "tiers": [{"name": str, "price": float}],   # two tiers: [weak, strong]; price in $/Mtok (input + output)
                                              # candidates: also "model", "n", "input_usd_per_mtok",
                                              # "output_usd_per_mtok", "output_tokens" (see below)
      "reference": str,                       # candidates only: the reference (an `@1` candidate's name)
      "head": {"members": [ {"layers": [{"weight": TENSOR, "bias": TENSOR, "activation": "relu"|"identity"}],
                             "output": "sigmoid"|"identity"|"softmax", "table": TENSOR | absent,
                             "weight": float} ]},
      "default_threshold_bp": int,            # two tiers: strong when score >= bp / 10000
      "default_cost_weight_bp": int,          # N tiers: lambda = bp / 10000 quality per $/Mtok
      "calibration": [ {...} ],               # see below
      "provenance": {"files": [{"path", "sha256", "rows_total", "rows_used"}], "split": "train", "rows": int,
                     "seed": int, "created": ISO-8601, "tiergate_version": str, "command": str},
      "metrics": {...},                       # figures measured at training time (informative)
      "sha256": hex                           # SHA-256 of the canonical JSON of every other field
    }

The head's input is the embedding followed by the listed prompt features, each standardised as
(value - mean) / std; the first layer of every member has `dim + len(features)` rows.

A member's output is `output_map(mlp(x))`, then, where a `table` `[k, out]` is present, `@ table`: a "softmax"
member with a table is a task classifier whose output is the probability-weighted mean of per-task figures
(docs/routing.md, "task head").

TENSOR is `{"dtype": "float16" | "float32", "shape": [..], "data": base64 of the little-endian bytes}`; we write
float16 and compute in float32.

Calibration rows, two tiers: `{"threshold_bp", "strong_share", "quality", "pgr"}`, thresholds descending, share
ascending, measured on held-out training rows (the router's own out-of-fold scores), so "threshold -> expected
strong-tier share and quality" is what the router will do on traffic like its training data. N tiers:
`{"cost_weight_bp", "cost", "quality", "shares": [per tier]}`. Read into a typed
`operating_points.CalibrationTable`, whose functions are the only readers.

Candidates (`kind: "candidates"`, BEST-Route): each tier is a candidate `MODEL@N` (N answers of MODEL, the best
one returned by a reward model), with its base `model`, `n` (>= 1), the model's list prices in USD per million
input and output tokens and `output_tokens`, the mean one-sample output length measured on the training rows. The
head has one output per candidate (predicted quality); the calibration rows are cost-weight points whose `cost`
is mean USD per 1k prompts and whose weights are quality per USD per 1k prompts. `tiergate.routing.candidates` is
the only run-time reader of these fields and holds the decision rule. The two other kinds carry none of these
fields, so their files are byte-identical to what older versions wrote.

Size: a 384-64-1 MLP ensemble of five is ~340 KiB of JSON, well under a ConfigMap's 1 MiB. `save_artifact`
refuses to write anything over `MAX_BYTES` (900 KiB): a larger head belongs in an OCI image or a volume, with
the RoutingPolicy pointing there (docs/routing.md).

`load_artifact` refuses (with `ArtifactError`) a file that is not JSON, has another format or a newer version,
fails its checksum, or whose shapes do not line up; a caller that already serves an artifact keeps it then.
`save_artifact` writes a temp file in the target folder and renames it over the target, so a reader sees the
old file or the new one, never half of one.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiergate.routing.encoder import MAX_TOKENS
from tiergate.routing.errors import ArtifactError
from tiergate.routing.format import ACTIVATIONS, FORMAT, FORMAT_VERSION, KINDS, LABEL_MODES, MAX_BYTES, OUTPUTS, digest
from tiergate.routing.operating_points import CalibrationTable

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# The routers shipped with the package (trained on the public data's train split; recipes in docs/routing.md).
DEFAULT_DIR = Path(__file__).resolve().parent / "default"
DEFAULT_TWO_TIER = DEFAULT_DIR / "two-tier.json"
DEFAULT_MULTI_TIER = DEFAULT_DIR / "multi-tier.json"


@dataclass(frozen=True)
class Layer:
    weight: npt.NDArray[np.float32]  # [in, out]
    bias: npt.NDArray[np.float32]  # [out]
    activation: str


@dataclass(frozen=True)
class Member:
    """One MLP of the head ensemble; the head's output is the weighted mean of its members' outputs."""

    layers: list[Layer]
    output: str
    weight: float = 1.0
    table: npt.NDArray[np.float32] | None = None  # [k, out], applied after the output map


@dataclass(frozen=True)
class EncoderSpec:
    id: str
    dim: int
    max_tokens: int = MAX_TOKENS
    pooling: str = "mean"
    normalize: bool = True


@dataclass(frozen=True)
class Feature:
    name: str
    mean: float
    std: float


@dataclass(frozen=True)
class Tier:
    name: str
    price: float
    # Candidates artifacts only (None elsewhere, and then not written): see the module docstring.
    model: str | None = None
    n: int | None = None
    input_usd_per_mtok: float | None = None
    output_usd_per_mtok: float | None = None
    output_tokens: float | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "price": self.price}
        if self.model is not None:
            doc.update(
                model=self.model,
                n=self.n,
                input_usd_per_mtok=self.input_usd_per_mtok,
                output_usd_per_mtok=self.output_usd_per_mtok,
                output_tokens=self.output_tokens,
            )
        return doc

    @classmethod
    def from_json(cls, t: dict[str, Any]) -> Tier:
        if "model" not in t:
            return cls(name=str(t["name"]), price=float(t["price"]))
        n = t["n"]
        if isinstance(n, bool) or not isinstance(n, int):
            raise ArtifactError(f"tier {t.get('name')!r}: n must be an integer, got {n!r}")
        return cls(
            name=str(t["name"]),
            price=float(t["price"]),
            model=str(t["model"]),
            n=n,
            input_usd_per_mtok=float(t["input_usd_per_mtok"]),
            output_usd_per_mtok=float(t["output_usd_per_mtok"]),
            output_tokens=float(t["output_tokens"]),
        )


@dataclass(frozen=True)
class RouterArtifact:
    encoder: EncoderSpec
    kind: str
    label_mode: str
    tiers: list[Tier]
    members: list[Member]
    calibration: CalibrationTable
    provenance: dict[str, Any]
    label_margin: float | None = None
    default_threshold_bp: int = 5000
    default_cost_weight_bp: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    features: list[Feature] = field(default_factory=list)
    # Candidates artifacts only: the reference candidate (an `@1` one), the quality every other is measured against.
    reference: str | None = None

    @property
    def out_dim(self) -> int:
        m = self.members[0]
        return int(m.table.shape[1]) if m.table is not None else int(m.layers[-1].bias.shape[0])

    def with_updates(self, **changes: Any) -> RouterArtifact:
        out = replace(self, **changes)
        validate(out)
        return out


def _tensor_to_json(a: npt.NDArray[Any]) -> dict[str, Any]:
    import numpy as np

    # float16 on disk halves the artifact (a ConfigMap budget matter); heads compute in float32, and the
    # rounding moves router scores by ~1e-4, far below any threshold step that matters.
    arr = np.ascontiguousarray(a, dtype="<f2")
    return {"dtype": "float16", "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def _tensor_from_json(obj: Any, what: str) -> npt.NDArray[np.float32]:
    import numpy as np

    dtypes = {"float16": "<f2", "float32": "<f4"}
    if not isinstance(obj, dict) or obj.get("dtype") not in dtypes or not isinstance(obj.get("shape"), list):
        raise ArtifactError(f"{what}: expected a float16 or float32 tensor object")
    try:
        shape = tuple(int(s) for s in obj["shape"])
        raw = base64.b64decode(obj["data"], validate=True)
        arr = np.frombuffer(raw, dtype=dtypes[obj["dtype"]]).astype(np.float32).reshape(shape)
    except (ValueError, TypeError, KeyError) as e:
        raise ArtifactError(f"{what}: bad tensor data ({e})") from e
    if not np.all(np.isfinite(arr)):
        raise ArtifactError(f"{what}: holds NaN or infinite values")
    return arr


def to_json_dict(art: RouterArtifact) -> dict[str, Any]:
    """The artifact as a JSON-ready dict, `sha256` included."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoder": {
            "id": art.encoder.id,
            "dim": art.encoder.dim,
            "max_tokens": art.encoder.max_tokens,
            "pooling": art.encoder.pooling,
            "normalize": art.encoder.normalize,
        },
        "kind": art.kind,
        "label_mode": art.label_mode,
        "label_margin": art.label_margin,
        "features": [{"name": f.name, "mean": f.mean, "std": f.std} for f in art.features],
        "tiers": [t.to_json() for t in art.tiers],
        "head": {
            "members": [
                {
                    "layers": [
                        {
                            "weight": _tensor_to_json(layer.weight),
                            "bias": _tensor_to_json(layer.bias),
                            "activation": layer.activation,
                        }
                        for layer in m.layers
                    ],
                    "output": m.output,
                    "weight": m.weight,
                    **({"table": _tensor_to_json(m.table)} if m.table is not None else {}),
                }
                for m in art.members
            ]
        },
        "default_threshold_bp": art.default_threshold_bp,
        "default_cost_weight_bp": art.default_cost_weight_bp,
        "calibration": art.calibration.to_json(),
        "provenance": art.provenance,
        "metrics": art.metrics,
    }
    if art.kind == "candidates":
        doc["reference"] = art.reference
    doc["sha256"] = digest(doc)
    return doc


def dumps(art: RouterArtifact) -> bytes:
    validate(art)
    try:
        text = json.dumps(to_json_dict(art), indent=1, allow_nan=False)
    except ValueError as e:
        raise ArtifactError(f"artifact holds a non-finite number: {e}") from e
    return (text + "\n").encode("utf-8")


def save_artifact(art: RouterArtifact, path: str | os.PathLike[str]) -> int:
    """Write `art` to `path` atomically (temp file in the same folder, fsync, rename). Returns the size in bytes.

    Raises `ArtifactError` (writing nothing) when the artifact is invalid or larger than `MAX_BYTES`."""
    data = dumps(art)
    if len(data) > MAX_BYTES:
        raise ArtifactError(
            f"artifact is {len(data)} bytes, over the {MAX_BYTES}-byte ConfigMap budget: use a smaller head "
            "(--hidden, --ensemble) or ship it in a volume"
        )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; an artifact is not secret and is read by other users (images, ConfigMaps).
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)


def loads(data: bytes | str, *, source: str = "artifact") -> RouterArtifact:
    """Parse and check an artifact; `ArtifactError` names `source` and what is wrong."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{source}: not a router artifact (invalid JSON: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ArtifactError(f"{source}: not a router artifact (format is not {FORMAT!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{source}: format_version missing or not an integer")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{source}: format version {version} is not supported by this tiergate (reads {FORMAT_VERSION}); "
            "retrain or upgrade"
        )
    if doc.get("sha256") != digest(doc):
        raise ArtifactError(f"{source}: checksum mismatch, the file is corrupt or was edited by hand")
    try:
        enc = doc["encoder"]
        art = RouterArtifact(
            encoder=EncoderSpec(
                id=str(enc["id"]),
                dim=int(enc["dim"]),
                max_tokens=int(enc["max_tokens"]),
                pooling=str(enc["pooling"]),
                normalize=bool(enc["normalize"]),
            ),
            kind=str(doc["kind"]),
            label_mode=str(doc["label_mode"]),
            label_margin=None if doc.get("label_margin") is None else float(doc["label_margin"]),
            tiers=[Tier.from_json(t) for t in doc["tiers"]],
            features=[
                Feature(name=str(f["name"]), mean=float(f["mean"]), std=float(f["std"]))
                for f in doc.get("features", [])
            ],
            members=[
                Member(
                    layers=[
                        Layer(
                            weight=_tensor_from_json(layer["weight"], f"member {i} layer {j} weight"),
                            bias=_tensor_from_json(layer["bias"], f"member {i} layer {j} bias"),
                            activation=str(layer["activation"]),
                        )
                        for j, layer in enumerate(m["layers"])
                    ],
                    output=str(m["output"]),
                    weight=float(m.get("weight", 1.0)),
                    table=_tensor_from_json(m["table"], f"member {i} table") if "table" in m else None,
                )
                for i, m in enumerate(doc["head"]["members"])
            ],
            calibration=CalibrationTable.from_json(doc["calibration"], str(doc["kind"])),
            provenance=dict(doc["provenance"]),
            default_threshold_bp=int(doc["default_threshold_bp"]),
            default_cost_weight_bp=int(doc["default_cost_weight_bp"]),
            metrics=dict(doc.get("metrics") or {}),
            reference=None if doc.get("reference") is None else str(doc["reference"]),
        )
    except ArtifactError as e:
        raise ArtifactError(f"{source}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{source}: malformed artifact ({type(e).__name__}: {e})") from e
    try:
        validate(art)
    except ArtifactError as e:
        raise ArtifactError(f"{source}: {e}") from e
    return art


def load_artifact(path: str | os.PathLike[str]) -> RouterArtifact:
    """Read and check the artifact at `path` (see the module docstring for what is refused)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{p}: cannot read router artifact: {e.strerror or e}") from e
    if len(data) > 4 * MAX_BYTES:
        raise ArtifactError(f"{p}: {len(data)} bytes is far too large for a router artifact")
    return loads(data, source=str(p))


def validate(art: RouterArtifact) -> None:
    """Check internal consistency: known kind/mode/activations, tier count, layer shapes chaining."""
    if art.kind not in KINDS:
        raise ArtifactError(f"unknown kind {art.kind!r} (known: {', '.join(KINDS)})")
    if art.label_mode not in LABEL_MODES:
        raise ArtifactError(f"unknown label mode {art.label_mode!r} (known: {', '.join(LABEL_MODES)})")
    if art.encoder.dim <= 0 or art.encoder.pooling != "mean" or not art.encoder.normalize:
        raise ArtifactError("encoder must be mean-pooled, L2-normalised, with a positive dim")
    names = [t.name for t in art.tiers]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ArtifactError(f"need at least two distinct tiers, got {names}")
    if art.kind == "two_tier" and len(names) != 2:
        raise ArtifactError(f"a two_tier artifact has exactly two tiers, got {len(names)}")
    if not art.members:
        raise ArtifactError("head has no members")
    want_out = 1 if art.kind == "two_tier" else len(names)
    for i, m in enumerate(art.members):
        if m.output not in OUTPUTS:
            raise ArtifactError(f"member {i}: unknown output {m.output!r}")
        if not m.layers or not m.weight > 0:
            raise ArtifactError(f"member {i}: needs layers and a positive weight")
        width = art.encoder.dim + len(art.features)
        for j, layer in enumerate(m.layers):
            if layer.activation not in ACTIVATIONS:
                raise ArtifactError(f"member {i} layer {j}: unknown activation {layer.activation!r}")
            if layer.weight.ndim != 2 or layer.weight.shape[0] != width or layer.bias.shape != layer.weight.shape[1:]:
                raise ArtifactError(
                    f"member {i} layer {j}: shape {tuple(layer.weight.shape)} / bias {tuple(layer.bias.shape)} "
                    f"does not follow width {width}"
                )
            width = int(layer.weight.shape[1])
        if m.table is not None:
            if m.table.ndim != 2 or m.table.shape[0] != width:
                raise ArtifactError(f"member {i}: table shape {tuple(m.table.shape)} does not follow width {width}")
            width = int(m.table.shape[1])
        if width != want_out:
            raise ArtifactError(f"member {i}: output width {width}, expected {want_out} for {art.kind}")
    from tiergate.routing.features import FEATURES

    for f in art.features:
        if f.name not in FEATURES:
            raise ArtifactError(f"unknown prompt feature {f.name!r} (this tiergate knows: {', '.join(FEATURES)})")
        if not f.std > 0:
            raise ArtifactError(f"feature {f.name!r} has a non-positive std {f.std}")
    if (art.kind == "two_tier" and art.calibration.cost_weights) or (
        art.kind != "two_tier" and art.calibration.thresholds
    ):
        raise ArtifactError(f"calibration table does not fit a {art.kind} artifact")
    _validate_candidates(art)
    if not 0 <= art.default_threshold_bp <= 10000:
        raise ArtifactError(f"default_threshold_bp {art.default_threshold_bp} outside 0..10000")
    if art.default_cost_weight_bp < 0:
        raise ArtifactError(f"default_cost_weight_bp {art.default_cost_weight_bp} is negative")


def _validate_candidates(art: RouterArtifact) -> None:
    """A candidates artifact: every tier a complete candidate, the reference an `@1` one among them; the other
    kinds carry no candidate fields at all (so nothing can mistake them for candidates)."""
    import math

    if art.kind != "candidates":
        if art.reference is not None or any(t.model is not None for t in art.tiers):
            raise ArtifactError(f"a {art.kind} artifact carries no reference or candidate fields")
        return
    for t in art.tiers:
        if t.model is None or t.n is None or t.input_usd_per_mtok is None or t.output_usd_per_mtok is None:
            raise ArtifactError(f"candidate {t.name!r}: needs model, n, input_usd_per_mtok and output_usd_per_mtok")
        if t.output_tokens is None or t.n < 1:
            raise ArtifactError(f"candidate {t.name!r}: needs output_tokens and n >= 1")
        figures = (t.input_usd_per_mtok, t.output_usd_per_mtok, t.output_tokens)
        if not all(math.isfinite(v) and v >= 0 for v in figures):
            raise ArtifactError(f"candidate {t.name!r}: prices and output_tokens must be finite and >= 0")
    ref = next((t for t in art.tiers if t.name == art.reference), None)
    if ref is None:
        raise ArtifactError(f"reference {art.reference!r} is not one of the candidates")
    if ref.n != 1:
        raise ArtifactError(f"reference {art.reference!r} must be a one-sample (@1) candidate, not n = {ref.n}")
    if art.label_mode != "quality":
        raise ArtifactError(f"a candidates artifact regresses quality; label mode {art.label_mode!r} does not fit")


class ArtifactSlot:
    """Holds the artifact in service and swaps in a new one only if it loads cleanly.

    For the router's hot reload: `reload(path)` returns None when the new artifact took over, or the
    `ArtifactError` that kept the last good one in place (the caller logs it and reports a condition). Not
    thread-safe by itself; the one assignment it makes is atomic in CPython, so readers see old or new."""

    def __init__(self, current: RouterArtifact | None = None) -> None:
        self.current = current

    def reload(self, path: str | os.PathLike[str]) -> ArtifactError | None:
        try:
            new = load_artifact(path)
        except ArtifactError as e:
            return e
        self.current = new
        return None
