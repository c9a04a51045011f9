"""Prompt features computed from the text itself, appended to the embedding as head inputs.

A mean-pooled, L2-normalised embedding keeps what a prompt is about but drops how long it is, and length
carries signal of its own: on RouteLLM's GSM8K train split the strong-minus-weak gain correlates +0.12 with
the prompt's length (longer word problems take more steps, where the weak model slips). Features are pure
Python on the text, so the router's hot path stays light; the artifact lists them by name with the training
mean and standard deviation used to standardise them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tiergate.routing.errors import RoutingError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from tiergate.routing.artifact import Feature

# name -> function of the prompt text. Names are part of the artifact format: never change what one computes.
FEATURES: dict[str, Callable[[str], float]] = {
    "log_chars": lambda text: math.log1p(len(text)),
}


def raw_features(names: Sequence[str], texts: Sequence[str]) -> npt.NDArray[np.float64]:
    """`[len(texts), len(names)]` unstandardised feature values."""
    import numpy as np

    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise RoutingError(f"unknown prompt feature(s) {', '.join(unknown)} (known: {', '.join(FEATURES)})")
    out = np.zeros((len(texts), len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        fn = FEATURES[name]
        for i, t in enumerate(texts):
            out[i, j] = fn(t)
    return out


def head_inputs(
    features: Sequence[Feature], emb: npt.NDArray[np.floating], texts: Sequence[str]
) -> npt.NDArray[np.float32]:
    """Embeddings followed by the standardised features: what every head member reads."""
    import numpy as np

    x = np.asarray(emb, dtype=np.float32)
    if not features:
        return x
    raw = raw_features([f.name for f in features], texts)
    z = (raw - np.array([f.mean for f in features])) / np.array([f.std for f in features])
    return np.concatenate([x, z.astype(np.float32)], axis=1)
