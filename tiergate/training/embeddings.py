"""The training-time embedding cache: MiniLM vectors on disk, keyed by encoder id and the prompt's SHA-256.

Training, evaluation and calibration embed the same public data again and again; on two CPU cores a cold pass
over it takes many minutes, a warm one seconds. The router never uses this (it embeds each prompt once).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiergate.cache import cache_root
from tiergate.routing.encoder import MINILM_DIM, MINILM_ID, Encoder, MiniLMEncoder, NoProgress, ProgressFactory
from tiergate.routing.errors import EncoderError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


def tqdm_progress(total: int, desc: str, unit: str = "prompt") -> Any:
    """A tqdm progress bar on stderr (the `train` extra's tqdm), or a no-op where tqdm is missing."""
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return NoProgress()
    return tqdm(total=total, desc=desc, file=sys.stderr, unit=unit, dynamic_ncols=True, mininterval=1.0)


def default_cache_dir() -> Path:
    """`embeddings/` under the tiergate cache root (`$TIERGATE_CACHE`, else ~/.cache/tiergate)."""
    return cache_root() / "embeddings"


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
