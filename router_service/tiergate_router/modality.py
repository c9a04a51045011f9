"""Input modalities of chat requests: which tiers accept what, which parts of a request are images or audio, and
whether the policy lets them through (`spec.router.attachments`).

Pure functions over the parsed body. `find_attachments` is on every chat request's path, so its text-only case is
a loop over the messages that looks at each content's type and nothing else (bench/modality_detection.py measures
it); everything that inspects a part happens only for requests that have one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tiergate_router.errors import BadRequestError, ConfigError

TEXT = "text"
IMAGE = "image"
AUDIO = "audio"
MODALITIES = (TEXT, IMAGE, AUDIO)
TEXT_ONLY: frozenset[str] = frozenset((TEXT,))

# OpenAI content-part types -> the modality they carry. `audio_url` is vLLM's extension (a URL, like image_url).
PART_MODALITY = {"image_url": IMAGE, "input_audio": AUDIO, "audio_url": AUDIO}

# What the router does when a specialist cannot read a part (spec.router.attachments.onSpecialistFailure), and how
# it serves requests with attachments (mixedRequests); the policy's enum values.
ANNOTATE = "Annotate"
FAIL = "Fail"
ROUTE_TO_CAPABLE_TIER = "RouteToCapableTier"
DECOMPOSE = "Decompose"

# Defaults of AttachmentPolicy, as the policy's (tiergate.api.policy.Attachments): eight parts covers a multi-page
# document photographed page by page; 4 MiB decoded is the default request body limit, so by default no single
# attachment is refused for its size before the body is.
DEFAULT_MAX_COUNT = 8
DEFAULT_MAX_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class AttachmentPolicy:
    """`spec.router.attachments` as the router applies it."""

    # Hosts an http(s) URL part may name: exact names, or `*.domain` for the domain's subdomains.
    allowed_hosts: tuple[str, ...] = ()
    max_count: int = DEFAULT_MAX_COUNT
    max_bytes: int = DEFAULT_MAX_BYTES
    on_specialist_failure: str = ANNOTATE
    mixed_requests: str = ROUTE_TO_CAPABLE_TIER

    def __post_init__(self) -> None:
        if self.max_count < 0 or self.max_bytes < 1:
            raise ConfigError("attachments: max_count must not be negative and max_bytes must be positive")
        if self.on_specialist_failure not in (ANNOTATE, FAIL):
            raise ConfigError(f"attachments.on_specialist_failure: {self.on_specialist_failure!r} is not Annotate/Fail")
        if self.mixed_requests not in (ROUTE_TO_CAPABLE_TIER, DECOMPOSE):
            raise ConfigError(f"attachments.mixed_requests: {self.mixed_requests!r} is not a known mode")


@dataclass(frozen=True)
class Attachment:
    """One image or audio part of a chat request."""

    modality: str
    message: int
    part: int
    # The part's type as sent (image_url, input_audio, audio_url).
    part_type: str
    # The URL's host for http(s) URLs; None for inline data.
    host: str | None
    # Decoded bytes of inline data (0 for URLs).
    size: int

    @property
    def where(self) -> str:
        return f"messages[{self.message}].content[{self.part}]"


def parse_modalities(value: str, where: str) -> frozenset[str]:
    """`text,image` -> the set; ConfigError names `where` for an unknown word or a set without text."""
    words = [w.strip() for w in value.split(",") if w.strip()]
    unknown = [w for w in words if w not in MODALITIES]
    if unknown or TEXT not in words:
        raise ConfigError(
            f"{where}: {value!r} must be a comma-separated list of {', '.join(MODALITIES)} that includes text"
        )
    return frozenset(words)


def find_attachments(messages: object) -> tuple[Attachment, ...]:
    """The image and audio parts of a (validated) chat body's `messages`, in order. BadRequestError names a part
    whose payload is malformed (no URL, not base64, a URL that is neither data: nor http(s))."""
    if not isinstance(messages, list):
        return ()
    found: list[Attachment] = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if type(content) is not list:  # a plain string: the common case, nothing to inspect
            continue
        for j, part in enumerate(content):
            ptype = part.get("type") if isinstance(part, dict) else None
            modality = PART_MODALITY.get(ptype) if isinstance(ptype, str) else None
            if modality is not None:
                assert isinstance(ptype, str)
                found.append(_attachment(part, modality, ptype, i, j))
    return tuple(found)


def _attachment(part: dict[str, Any], modality: str, ptype: str, i: int, j: int) -> Attachment:
    where = f"messages[{i}].content[{j}]"
    payload = part.get(ptype)
    if ptype == "input_audio":
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, str) or not data:
            raise BadRequestError(
                f"'{where}.input_audio.data' must be a non-empty base64 string",
                param=f"{where}.input_audio.data",
                code="invalid_attachment",
            )
        return Attachment(modality, i, j, ptype, None, base64_size(data))
    url = payload.get("url") if isinstance(payload, dict) else None
    if not isinstance(url, str) or not url:
        raise BadRequestError(
            f"'{where}.{ptype}.url' must be a non-empty string", param=f"{where}.{ptype}.url", code="invalid_attachment"
        )
    if url[:5].lower() == "data:":
        _, sep, data = url.partition(",")
        if not sep or ";base64" not in url[: len(url) - len(data)].lower():
            raise BadRequestError(
                f"'{where}.{ptype}.url' is a data: URL without base64 data",
                param=f"{where}.{ptype}.url",
                code="invalid_attachment",
            )
        return Attachment(modality, i, j, ptype, None, base64_size(data))
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        host = None
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not host:
        raise BadRequestError(
            f"'{where}.{ptype}.url' must be a data: URL or an http(s) URL",
            param=f"{where}.{ptype}.url",
            code="invalid_attachment",
        )
    return Attachment(modality, i, j, ptype, host.lower(), 0)


def base64_size(data: str) -> int:
    """Decoded size of base64 text, without decoding it (whitespace is rare and only makes this an overestimate)."""
    n = len(data)
    return n * 3 // 4 - (2 if data.endswith("==") else 1 if data.endswith("=") else 0)


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    for a in allowed:
        if a.startswith("*."):
            if host.endswith(a[1:]) and len(host) > len(a) - 1:
                return True
        elif host == a:
            return True
    return False


def check_attachments(found: Sequence[Attachment], policy: AttachmentPolicy) -> None:
    """The policy's limits: count (400), inline size (413), URL hosts (400 naming the host)."""
    if len(found) > policy.max_count:
        raise BadRequestError(
            f"the request has {len(found)} image/audio parts; the router accepts at most {policy.max_count}",
            param="messages",
            code="too_many_attachments",
        )
    for a in found:
        if a.size > policy.max_bytes:
            raise BadRequestError(
                f"'{a.where}' ({a.modality}) is {a.size} bytes; the router accepts at most {policy.max_bytes} per "
                "attachment",
                status=413,
                param=a.where,
                code="attachment_too_large",
            )
        if a.host is not None and not host_allowed(a.host, policy.allowed_hosts):
            raise BadRequestError(
                f"'{a.where}' names the host {a.host!r}, which the policy does not allow "
                "(spec.router.attachments.allowedHosts); send the data inline as a data: URL",
                param=a.where,
                code="attachment_host_not_allowed",
            )


def modalities_of(found: Iterable[Attachment]) -> frozenset[str]:
    """The modalities a request needs: text, and those of its attachments."""
    return TEXT_ONLY.union(a.modality for a in found)


@dataclass(frozen=True)
class Specialist:
    """Parts of one modality that the answering tier cannot take, and the tiers that can (cheapest first)."""

    modality: str
    chain: tuple[str, ...]


def capable_tiers(tier_modalities: Sequence[tuple[str, frozenset[str]]], needed: frozenset[str]) -> list[str]:
    """Tier names (cheapest first) accepting every modality in `needed`."""
    return [name for name, mods in tier_modalities if needed <= mods]


def unservable(tier_modalities: Sequence[tuple[str, frozenset[str]]], needed: frozenset[str]) -> list[str]:
    """The modalities in `needed` no tier accepts at all."""
    served = frozenset().union(*(mods for _, mods in tier_modalities))
    return [m for m in MODALITIES if m in needed and m not in served]


def refuse_unservable(missing: Sequence[str], allowed: Sequence[str] | None = None) -> BadRequestError:
    names = ", ".join(missing)
    scope = "no tier the request may use" if allowed is not None else "no tier of this router"
    return BadRequestError(
        f"the request contains {names} input, which {scope} accepts (spec.tiers[].modalities)",
        param="messages",
        code="unsupported_modality",
    )


def specialists_for(
    answering: frozenset[str],
    needed: frozenset[str],
    tier_modalities: Sequence[tuple[str, frozenset[str]]],
    allowed: frozenset[str] | None,
) -> tuple[Specialist, ...]:
    """For each modality in `needed` the answering tier does not accept, the tiers (cheapest first, among `allowed`)
    that do. BadRequestError (400 naming the modality) when no allowed tier does."""
    out: list[Specialist] = []
    missing: list[str] = []
    for m in MODALITIES:
        if m not in needed or m in answering:
            continue
        chain = tuple(n for n, mods in tier_modalities if m in mods and (allowed is None or n in allowed))
        if chain:
            out.append(Specialist(m, chain))
        else:
            missing.append(m)
    if missing:
        raise refuse_unservable(missing, None if allowed is None else sorted(allowed))
    return tuple(out)


def narrowed(tiers: frozenset[str] | None, capable: Sequence[str]) -> frozenset[str] | None:
    """The tiers a request may be routed to: the tenant's (`tiers`, None: all) that accept its modalities. None
    when that leaves nothing (the request is then decomposed instead)."""
    out = frozenset(capable) if tiers is None else tiers & frozenset(capable)
    return out or None
