"""Reading per-prompt outcome files (JSONL) and price files, with errors that name the file and line.

Outcome format (one JSON object a line; README.md, "Routing data"): `id` (str, unique per file),
`prompt` (str), `scores` ({model: number in [0, 1]}), and optional `task` (str), `split` ("train"/"test"),
`tokens`, `cost_usd`. Blank lines are skipped. Several files can be read at once; rows keep file order.

Validation is complete before anything is returned, so a caller that writes output only after loading never
writes a partial result from a bad file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiergate.routing.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


@dataclass(frozen=True)
class FileProvenance:
    """Where training or evaluation rows came from: enough to tell whether two runs saw the same data."""

    path: str
    sha256: str
    rows_total: int
    rows_used: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "rows_total": self.rows_total, "rows_used": self.rows_used}


@dataclass(frozen=True)
class OutcomeSet:
    """Rows of outcome data restricted to `models`, scores as a `[n, len(models)]` float64 matrix."""

    models: tuple[str, ...]
    ids: list[str]
    prompts: list[str]
    tasks: list[str]
    splits: list[str]
    scores: npt.NDArray[np.float64]
    # (path, 1-based line) of every row, so later checks can name the line too.
    origins: list[tuple[str, int]] = field(default_factory=list)
    provenance: list[FileProvenance] = field(default_factory=list)
    # `tokens` of the `token_columns` asked for (load_outcomes): `[n, len(token_columns)]` input and output token
    # counts, NaN where a row gives none for that column; None when no columns were asked for.
    token_columns: tuple[str, ...] = ()
    tokens_in: npt.NDArray[np.float64] | None = None
    tokens_out: npt.NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, mask: Sequence[bool] | npt.NDArray[np.bool_]) -> OutcomeSet:
        import numpy as np

        m = np.asarray(mask, dtype=bool)
        pick = [i for i in range(len(self.ids)) if m[i]]
        return OutcomeSet(
            models=self.models,
            ids=[self.ids[i] for i in pick],
            prompts=[self.prompts[i] for i in pick],
            tasks=[self.tasks[i] for i in pick],
            splits=[self.splits[i] for i in pick],
            scores=self.scores[m],
            origins=[self.origins[i] for i in pick],
            provenance=self.provenance,
            token_columns=self.token_columns,
            tokens_in=None if self.tokens_in is None else self.tokens_in[m],
            tokens_out=None if self.tokens_out is None else self.tokens_out[m],
        )


def _require_str(obj: dict[str, Any], key: str, path: str, line: int, *, optional: bool = False) -> str:
    if key not in obj:
        if optional:
            return ""
        raise DataError(f"missing field {key!r}", path=path, line=line)
    val = obj[key]
    if not isinstance(val, str):
        raise DataError(f"field {key!r} must be a string, got {type(val).__name__}", path=path, line=line)
    return val


def _row_tokens(obj: dict[str, Any], columns: Sequence[str], path: str, line: int) -> list[tuple[float, float]]:
    """(input, output) token counts of each of `columns` in the row's optional `tokens`, NaN where absent."""
    nan = float("nan")
    tokens = obj.get("tokens")
    if tokens is None:
        return [(nan, nan)] * len(columns)
    if not isinstance(tokens, dict):
        raise DataError("field 'tokens' must be an object {model: {input, output}}", path=path, line=line)
    out = []
    for c in columns:
        t = tokens.get(c)
        if t is None:
            out.append((nan, nan))
            continue
        vals = [t.get(k) if isinstance(t, dict) else None for k in ("input", "output")]
        counts = [float(v) for v in vals if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(counts) != 2 or not all(math.isfinite(v) and v >= 0 for v in counts):
            raise DataError(f"tokens of {c!r} must be {{input, output}} counts >= 0, got {t!r}", path=path, line=line)
        out.append((counts[0], counts[1]))
    return out


def load_outcomes(
    paths: Sequence[str | Path],
    models: Sequence[str],
    *,
    split: str | None = None,
    token_columns: Sequence[str] = (),
) -> OutcomeSet:
    """Read outcome files, keeping rows of `split` (all rows when None) and the scores of `models`; with
    `token_columns`, also the rows' `tokens` of those columns (NaN where a row gives none).

    Raises `DataError` naming file and line for: invalid JSON, a non-object line, a missing or mistyped field,
    a duplicate id within a file, a score that is not a number in [0, 1], and a row lacking a score for one of
    `models` (an unknown model), malformed `tokens` of a wanted column; also when no row is left after the split
    filter.
    """
    import numpy as np

    if not models:
        raise DataError("no models (tiers) given")
    if len(set(models)) != len(models):
        raise DataError(f"models listed twice: {', '.join(models)}")
    ids: list[str] = []
    prompts: list[str] = []
    tasks: list[str] = []
    splits: list[str] = []
    rows: list[list[float]] = []
    origins: list[tuple[str, int]] = []
    provenance: list[FileProvenance] = []
    token_rows: list[list[tuple[float, float]]] = []
    for p in paths:
        path = str(p)
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read: {e.strerror or e}", path=path) from e
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError("not valid UTF-8", path=path, line=line) from e
        seen: set[str] = set()
        total = used = 0
        for lineno, line_text in enumerate(text.split("\n"), start=1):
            # split("\n"), not splitlines(): prompts hold U+2028 and other characters splitlines() breaks on.
            if not line_text.strip():
                continue
            total += 1
            try:
                obj = json.loads(line_text)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path=path, line=lineno) from e
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=lineno)
            row_id = _require_str(obj, "id", path, lineno)
            prompt = _require_str(obj, "prompt", path, lineno)
            task = _require_str(obj, "task", path, lineno, optional=True)
            row_split = _require_str(obj, "split", path, lineno, optional=True)
            if row_id in seen:
                raise DataError(f"duplicate id {row_id!r}", path=path, line=lineno)
            seen.add(row_id)
            if "scores" not in obj:
                raise DataError("missing field 'scores'", path=path, line=lineno)
            scores = obj["scores"]
            if not isinstance(scores, dict):
                raise DataError("field 'scores' must be an object {model: score}", path=path, line=lineno)
            vals: list[float] = []
            for m in models:
                if m not in scores:
                    known = ", ".join(sorted(scores)) or "none"
                    raise DataError(f"no score for model {m!r} (this row has: {known})", path=path, line=lineno)
                v = scores[m]
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not 0 <= v <= 1:
                    raise DataError(f"score of {m!r} must be a number in [0, 1], got {v!r}", path=path, line=lineno)
                vals.append(float(v))
            row_tokens = _row_tokens(obj, token_columns, path, lineno) if token_columns else []
            if split is not None and row_split != split:
                continue
            token_rows.append(row_tokens)
            used += 1
            ids.append(row_id)
            prompts.append(prompt)
            tasks.append(task)
            splits.append(row_split)
            rows.append(vals)
            origins.append((path, lineno))
        provenance.append(FileProvenance(path, hashlib.sha256(raw).hexdigest(), total, used))
    if not rows:
        where = ", ".join(str(p) for p in paths)
        raise DataError(f"no rows{f' with split == {split!r}' if split else ''} in {where}")
    tok = np.asarray(token_rows, dtype=np.float64).reshape(len(rows), len(token_columns), 2)
    return OutcomeSet(
        models=tuple(models),
        ids=ids,
        prompts=prompts,
        tasks=tasks,
        splits=splits,
        scores=np.asarray(rows, dtype=np.float64).reshape(len(rows), len(models)),
        origins=origins,
        provenance=provenance,
        token_columns=tuple(token_columns),
        tokens_in=tok[:, :, 0] if token_columns else None,
        tokens_out=tok[:, :, 1] if token_columns else None,
    )


def read_json_object(path: str | Path, shape: str) -> dict[str, Any]:
    """A JSON file holding one object (a prices file); `DataError` naming the file when it cannot be read, is not
    JSON, or holds something else (`shape` says what was expected, for the message)."""
    p = str(path)
    try:
        doc = json.loads(Path(p).read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path=p) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"invalid JSON: {e}", path=p) from e
    if not isinstance(doc, dict):
        raise DataError(f"expected a JSON object {shape}", path=p)
    return doc


def load_prices(path: str | Path, models: Sequence[str]) -> list[float]:
    """Per-model price in $/Mtok (input + output) from a JSON file.

    Accepts `{model: {"input_usd_per_mtok": x, "output_usd_per_mtok": y}}` (llmrouter-models.json) or
    `{model: price}`. Every model in `models` must be present with non-negative finite prices.
    """
    p = str(path)
    doc = read_json_object(p, "{model: price}")
    out: list[float] = []
    for m in models:
        if m not in doc:
            raise DataError(f"no price for model {m!r}", path=p)
        entry = doc[m]
        if isinstance(entry, dict):
            try:
                price = float(entry["input_usd_per_mtok"]) + float(entry["output_usd_per_mtok"])
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(
                    f"price of {m!r} needs numeric input_usd_per_mtok and output_usd_per_mtok", path=p
                ) from e
        elif isinstance(entry, int | float) and not isinstance(entry, bool):
            price = float(entry)
        else:
            raise DataError(f"price of {m!r} must be a number or an object, got {entry!r}", path=p)
        if not math.isfinite(price) or price < 0:
            raise DataError(f"price of {m!r} must be finite and >= 0, got {price}", path=p)
        out.append(price)
    return out
