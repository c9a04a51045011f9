"""Multimodal configuration without servers: `spec.tiers[].modalities` and `spec.router.attachments` in the typed
policy, through the operator's router policy document into the RouterConfig; `--tier-modalities NAME=text,image`;
the pure detection, limit and inlining functions."""

from __future__ import annotations

import argparse
import base64
from typing import Any

import pytest
import yaml

from tiergate.api.errors import PolicyValidationError
from tiergate.api.policy import RoutingPolicy, parse_policy
from tiergate_operator.builders import router_policy_document
from tiergate_router.cmd_serve import configure, overrides
from tiergate_router.config import ConfigError, from_policy, serve_config
from tiergate_router.decompose import StepResult, inlined_body, specialist_body
from tiergate_router.errors import BadRequestError
from tiergate_router.modality import (
    ANNOTATE,
    DECOMPOSE,
    FAIL,
    TEXT_ONLY,
    Attachment,
    AttachmentPolicy,
    base64_size,
    capable_tiers,
    check_attachments,
    find_attachments,
    host_allowed,
    narrowed,
    parse_modalities,
    specialists_for,
)


def manifest(tiers: list[dict[str, Any]] | None = None, router: dict[str, Any] | None = None) -> dict[str, Any]:
    price = {"inputPerMillion": 1, "outputPerMillion": 2}
    return {
        "apiVersion": "tiergate.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "mm", "namespace": "team"},
        "spec": {
            "tiers": tiers
            or [
                {"name": "small", "model": "s", "price": price, "endpoint": {"url": "http://127.0.0.1:1/v1"}},
                {
                    "name": "vision",
                    "model": "v",
                    "price": price,
                    "endpoint": {"url": "http://127.0.0.1:2/v1"},
                    "modalities": ["text", "image"],
                },
            ],
            "router": router or {"thresholdBasisPoints": 5000},
        },
    }


def test_modalities_default_to_text_and_travel_to_the_router() -> None:
    p = parse_policy(
        manifest(
            router={
                "thresholdBasisPoints": 5000,
                "attachments": {
                    "allowedHosts": ["images.example.com", "*.cdn.example.org"],
                    "maxCount": 3,
                    "maxBytes": 4096,
                    "onSpecialistFailure": "Fail",
                    "mixedRequests": "Decompose",
                },
            }
        )
    )
    assert [m.value for m in p.spec.tiers[0].modalities] == ["text"]
    # The operator's document for the router carries both fields; the router reads them from it.
    doc = yaml.safe_load(router_policy_document(p))
    assert doc["spec"]["tiers"][0]["modalities"] == ["text"]
    assert doc["spec"]["tiers"][1]["modalities"] == ["text", "image"]
    cfg = from_policy(RoutingPolicy.model_validate(doc))
    assert cfg.tier("small").modalities == TEXT_ONLY
    assert cfg.tier("vision").modalities == {"text", "image"}
    assert cfg.attachments == AttachmentPolicy(
        allowed_hosts=("images.example.com", "*.cdn.example.org"),
        max_count=3,
        max_bytes=4096,
        on_specialist_failure=FAIL,
        mixed_requests=DECOMPOSE,
    )
    # Absent: the defaults.
    assert from_policy(parse_policy(manifest())).attachments == AttachmentPolicy()


@pytest.mark.parametrize(
    ("modalities", "needle"),
    [
        (["image"], "must include text"),
        (["text", "text"], "not repeat"),
        (["text", "video"], "text"),
        ([], "at least 1"),
    ],
)
def test_bad_modalities_are_refused_naming_the_field(modalities: list[str], needle: str) -> None:
    m = manifest()
    m["spec"]["tiers"][1]["modalities"] = modalities
    with pytest.raises(PolicyValidationError) as err:
        parse_policy(m)
    assert "spec.tiers[1].modalities" in str(err.value)
    assert needle in str(err.value)


def test_bad_allowed_host_is_refused() -> None:
    m = manifest(router={"attachments": {"allowedHosts": ["http://evil.example.com/"]}})
    with pytest.raises(PolicyValidationError) as err:
        parse_policy(m)
    assert "spec.router.attachments.allowedHosts[0]" in str(err.value)


def parse_serve(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(list(argv))


def test_tier_modalities_flag_exact_form() -> None:
    args = parse_serve(
        "--tier",
        "small=http://127.0.0.1:1/v1",
        "--tier",
        "vision=http://127.0.0.1:2/v1",
        "--tier-modalities",
        "vision=text,image",
        "--tier-modalities",
        "small=text,audio",
    )
    cfg = serve_config(None, overrides(args), None)
    assert cfg.tier("vision").modalities == {"text", "image"}
    assert cfg.tier("small").modalities == {"text", "audio"}


def test_tier_modalities_flag_over_a_policy() -> None:
    args = parse_serve("--tier-modalities", "small=text,image,audio")
    cfg = serve_config(parse_policy(manifest()), overrides(args), None)
    assert cfg.tier("small").modalities == {"text", "image", "audio"}
    assert cfg.tier("vision").modalities == {"text", "image"}


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("vision", "expected NAME=MODALITIES"),
        ("vision=image", "includes text"),
        ("vision=text,video", "includes text"),
    ],
)
def test_bad_tier_modalities_flags(value: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        overrides(parse_serve("--tier", "vision=http://127.0.0.1:2/v1", "--tier-modalities", value))
    assert "--tier-modalities" in str(err.value)
    assert needle in str(err.value)


def test_tier_modalities_flag_for_an_unknown_tier() -> None:
    args = parse_serve("--tier", "small=http://127.0.0.1:1/v1", "--tier-modalities", "big=text,image")
    with pytest.raises(ConfigError, match="--tier-modalities big: no such tier"):
        serve_config(None, overrides(args), None)


def test_parse_modalities() -> None:
    assert parse_modalities("text, image", "x") == {"text", "image"}


# --- detection and limits ----------------------------------------------------------------------------------------


def test_text_only_requests_have_no_attachments() -> None:
    assert find_attachments([{"role": "user", "content": "hi"}]) == ()
    assert find_attachments([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) == ()
    assert find_attachments(None) == ()


def test_attachments_are_found_with_their_place_size_and_host() -> None:
    data = base64.b64encode(b"0123456789").decode()
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}},
                {"type": "image_url", "image_url": {"url": "HTTPS://Images.Example.com/a.png"}},
                {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                {"type": "audio_url", "audio_url": {"url": "http://10.0.0.1:8080/a.wav"}},
            ],
        },
    ]
    found = find_attachments(messages)
    assert [(a.modality, a.where, a.host, a.size) for a in found] == [
        ("image", "messages[1].content[1]", None, 10),
        ("image", "messages[1].content[2]", "images.example.com", 0),
        ("audio", "messages[1].content[3]", None, 10),
        ("audio", "messages[1].content[4]", "10.0.0.1", 0),
    ]
    with pytest.raises(BadRequestError) as err:
        check_attachments(found, AttachmentPolicy(allowed_hosts=("images.example.com",)))
    assert err.value.param == "messages[1].content[4]"


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 100])
def test_base64_size_is_the_decoded_size(n: int) -> None:
    assert base64_size(base64.b64encode(b"x" * n).decode()) == n


def test_host_allowed() -> None:
    allowed = ("images.example.com", "*.cdn.example.org")
    assert host_allowed("images.example.com", allowed)
    assert host_allowed("a.cdn.example.org", allowed)
    assert host_allowed("a.b.cdn.example.org", allowed)
    assert not host_allowed("cdn.example.org", allowed)
    assert not host_allowed("evilcdn.example.org", allowed)
    assert not host_allowed("images.example.com.evil.net", allowed)
    assert not host_allowed("127.0.0.1", ())


def test_limits() -> None:
    big = Attachment("image", 0, 1, "image_url", None, 5000)
    url = Attachment("image", 0, 2, "image_url", "metadata.internal", 0)
    with pytest.raises(BadRequestError) as err:
        check_attachments([big], AttachmentPolicy(max_bytes=4096))
    assert err.value.status == 413
    with pytest.raises(BadRequestError) as err:
        check_attachments([url], AttachmentPolicy())
    assert err.value.status == 400
    assert "'metadata.internal'" in err.value.message
    with pytest.raises(BadRequestError) as err:
        check_attachments([url, url], AttachmentPolicy(max_count=1, allowed_hosts=("metadata.internal",)))
    assert err.value.code == "too_many_attachments"
    check_attachments([big, url], AttachmentPolicy(allowed_hosts=("metadata.internal",)))


def test_bad_attachment_policy_values() -> None:
    with pytest.raises(ConfigError):
        AttachmentPolicy(on_specialist_failure="Ignore")
    with pytest.raises(ConfigError):
        AttachmentPolicy(mixed_requests="Sometimes")


# --- the decomposition's shapes ----------------------------------------------------------------------------------


def test_specialist_body_and_inlining() -> None:
    body = {
        "model": "tiergate",
        "temperature": 0.2,
        "messages": [
            {"role": "user", "content": "first"},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "and this?"},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,BBBB"}},
                ],
            },
        ],
    }
    found = find_attachments(body["messages"])
    sb = specialist_body(body, found[2])
    assert sb["messages"][0]["content"][1] == body["messages"][1]["content"][3]  # type: ignore[index]
    assert sb["stream"] is False
    results = [
        StepResult(found[0], "vision", "a cat"),
        StepResult(found[1], None, None, "no audio tier answered within 1 s", timed_out=True),
        StepResult(found[2], "vision", "a dog"),
    ]
    out = inlined_body(body, results)
    assert out["temperature"] == 0.2
    assert out["messages"][0] == {"role": "user", "content": "first"}
    assert [p["text"] for p in out["messages"][1]["content"]] == [
        "[image 1, description by the vision tier: a cat]",
        "and this?",
        "[audio 1 could not be read: no audio tier answered within 1 s]",
        "[image 2, description by the vision tier: a dog]",
    ]
    # The client's body is not changed (a fallback or a retry sends what the client sent).
    assert body["messages"][1]["content"][0]["type"] == "image_url"  # type: ignore[index]
    assert ANNOTATE != FAIL


TIERS = (
    ("small", TEXT_ONLY),
    ("vision", frozenset({"text", "image"})),
    ("omni", frozenset({"text", "image", "audio"})),
    ("vision-xl", frozenset({"text", "image"})),
)


def test_capable_tiers_and_a_tenants_narrowing() -> None:
    both = frozenset({"text", "image", "audio"})
    assert capable_tiers(TIERS, frozenset({"text", "image"})) == ["vision", "omni", "vision-xl"]
    assert capable_tiers(TIERS, both) == ["omni"]
    assert narrowed(None, ["omni"]) == {"omni"}
    assert narrowed(frozenset({"small", "omni"}), ["vision", "omni"]) == {"omni"}
    # A tenant that may use no capable tier: no narrowing (the request is decomposed on its tiers instead).
    assert narrowed(frozenset({"small"}), ["omni"]) is None


def test_specialists_are_the_allowed_tiers_taking_the_modality_cheapest_first() -> None:
    needed = frozenset({"text", "image", "audio"})
    [img, aud] = specialists_for(TEXT_ONLY, needed, TIERS, None)
    assert (img.modality, img.chain) == ("image", ("vision", "omni", "vision-xl"))
    assert (aud.modality, aud.chain) == ("audio", ("omni",))
    # The answering tier takes images itself: only the audio is decomposed.
    [only] = specialists_for(frozenset({"text", "image"}), needed, TIERS, None)
    assert only.modality == "audio"
    [img] = specialists_for(TEXT_ONLY, frozenset({"text", "image"}), TIERS, frozenset({"small", "vision-xl"}))
    assert img.chain == ("vision-xl",)
    with pytest.raises(BadRequestError) as err:
        specialists_for(TEXT_ONLY, needed, TIERS, frozenset({"small", "vision"}))
    assert err.value.code == "unsupported_modality"
    assert "audio input, which no tier the request may use accepts" in err.value.message
