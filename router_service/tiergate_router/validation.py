"""Pure validation of OpenAI-style request bodies. Every failure is a BadRequestError naming the field.

The router validates only what it needs to route safely (types of the fields it reads, the shape of messages)
and forwards everything else unchanged, so vLLM's extra sampling parameters keep working through it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from tiergate_router.errors import BadRequestError

ROLES = ("system", "user", "assistant", "tool", "developer", "function")


@dataclass(frozen=True)
class ParsedRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    # The text the classifier scores: the last user message for chat (the question being asked), the prompt for
    # completions.
    prompt_text: str


def decode_json_object(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequestError(
            f"request body is not valid UTF-8 (byte {e.start}: {e.reason})", code="invalid_encoding"
        ) from e
    if not text.strip():
        raise BadRequestError("request body is empty; expected a JSON object", code="invalid_json")
    try:
        # Standard JSON only: NaN/Infinity are not JSON and would break upstream servers.
        body = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise BadRequestError(
            f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", code="invalid_json"
        ) from e
    except ValueError as e:
        raise BadRequestError(f"request body is not valid JSON: {e}", code="invalid_json") from e
    except RecursionError as e:
        raise BadRequestError("request body is nested too deeply", code="invalid_json") from e
    if not isinstance(body, dict):
        raise BadRequestError(f"request body must be a JSON object, not {_kind(body)}", code="invalid_json")
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _kind(v: object) -> str:
    if v is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(v), type(v).__name__)


def _require_str(body: dict[str, Any], key: str, *, required: bool) -> str | None:
    if key not in body or (body[key] is None and not required):
        if required:
            raise BadRequestError(f"'{key}' is required", param=key, code="missing_required_parameter")
        return None
    v = body[key]
    if not isinstance(v, str):
        raise BadRequestError(f"'{key}' must be a string, not {_kind(v)}", param=key, code="invalid_type")
    return v


def _check_common(body: dict[str, Any]) -> tuple[str, bool]:
    model = _require_str(body, "model", required=True)
    assert model is not None
    if not model:
        raise BadRequestError("'model' must not be empty", param="model", code="invalid_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequestError(f"'stream' must be a boolean, not {_kind(stream)}", param="stream", code="invalid_type")
    for key in ("max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs"):
        if key in body and body[key] is not None:
            v = body[key]
            if isinstance(v, bool) or not isinstance(v, int):
                raise BadRequestError(f"'{key}' must be an integer, not {_kind(v)}", param=key, code="invalid_type")
            if key in ("max_tokens", "max_completion_tokens", "n") and v < 1:
                raise BadRequestError(f"'{key}' must be at least 1, got {v}", param=key, code="invalid_value")
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if key in body and body[key] is not None:
            v = body[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise BadRequestError(f"'{key}' must be a number, not {_kind(v)}", param=key, code="invalid_type")
    if "stop" in body and body["stop"] is not None:
        stop = body["stop"]
        if not isinstance(stop, str) and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise BadRequestError("'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    if "stream_options" in body and body["stream_options"] is not None and not isinstance(body["stream_options"], dict):
        raise BadRequestError("'stream_options' must be an object", param="stream_options", code="invalid_type")
    return model, stream


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise BadRequestError(
                    f"'{where}[{j}]' must be a content part object, not {_kind(part)}",
                    param=f"{where}[{j}]",
                    code="invalid_type",
                )
            ptype = part.get("type")
            if not isinstance(ptype, str):
                raise BadRequestError(
                    f"'{where}[{j}].type' must be a string", param=f"{where}[{j}].type", code="invalid_type"
                )
            if ptype == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise BadRequestError(
                        f"'{where}[{j}].text' must be a string, not {_kind(text)}",
                        param=f"{where}[{j}].text",
                        code="invalid_type",
                    )
                parts.append(text)
        return "\n".join(parts)
    raise BadRequestError(
        f"'{where}' must be a string or an array of content parts, not {_kind(content)}",
        param=where,
        code="invalid_type",
    )


def parse_chat(body: dict[str, Any]) -> ParsedRequest:
    model, stream = _check_common(body)
    messages = body.get("messages")
    if messages is None:
        raise BadRequestError("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise BadRequestError(
            f"'messages' must be an array, not {_kind(messages)}", param="messages", code="invalid_type"
        )
    if not messages:
        raise BadRequestError("'messages' must contain at least one message", param="messages", code="invalid_value")
    last_user = ""
    any_text = ""
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequestError(f"'{where}' must be an object, not {_kind(m)}", param=where, code="invalid_type")
        role = m.get("role")
        if not isinstance(role, str):
            raise BadRequestError(
                f"'{where}.role' must be a string, not {_kind(role)}", param=f"{where}.role", code="invalid_type"
            )
        if role not in ROLES:
            raise BadRequestError(
                f"'{where}.role' must be one of {', '.join(ROLES)}; got {role!r}",
                param=f"{where}.role",
                code="invalid_value",
            )
        content = m.get("content")
        if content is None:
            # Assistant messages with tool calls may omit content; everything else needs it.
            if role == "assistant" and m.get("tool_calls"):
                continue
            raise BadRequestError(
                f"'{where}.content' is required", param=f"{where}.content", code="missing_required_parameter"
            )
        text = _content_text(content, f"{where}.content")
        if role == "user":
            last_user = text
        any_text = any_text or text
    return ParsedRequest(body=body, model=model, stream=stream, prompt_text=last_user or any_text)


def parse_completion(body: dict[str, Any]) -> ParsedRequest:
    model, stream = _check_common(body)
    if "prompt" not in body or body["prompt"] is None:
        raise BadRequestError("'prompt' is required", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        text = prompt[0]
    else:
        raise BadRequestError(
            f"'prompt' must be a string or a non-empty array of strings, not {_kind(prompt)}",
            param="prompt",
            code="invalid_type",
        )
    return ParsedRequest(body=body, model=model, stream=stream, prompt_text=text)
