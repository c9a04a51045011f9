"""Quiet third-party chatter during one-off model preparation.

Exporting the encoder to ONNX, quantising it and converting the demo's GGUF model make torch, transformers, tqdm
and ONNX Runtime print progress bars, tracer warnings and advice meant for their own developers (about 60 lines on a
first `make run`), which bury what the user asked to see. Unless the root logger is at INFO or below
(`tiergate serve -v`), they are hidden for the duration of the preparation; the caller logs one line saying what is
being prepared. Errors still surface: exceptions propagate, ERROR records still reach the handlers, and what the
libraries wrote to stderr is written out after all when the preparation fails.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    root = logging.getLogger()
    if root.isEnabledFor(logging.INFO):  # asked for (-v): show everything
        yield
        return
    old_level = root.level
    hf_logging: Any = None  # transformers' logging module, when transformers is installed (not in the router image)
    with contextlib.suppress(ModuleNotFoundError):
        from transformers.utils import logging as hf_logging
    hf_verbosity = hf_logging.get_verbosity() if hf_logging is not None else None
    # Progress bars (tqdm, created by the libraries with their own settings) write to sys.stderr: held back here.
    captured = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            root.setLevel(logging.ERROR)
            if hf_logging is not None:
                hf_logging.set_verbosity_error()
                hf_logging.disable_progress_bar()
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        root.setLevel(old_level)
        if hf_logging is not None and hf_verbosity is not None:
            hf_logging.set_verbosity(hf_verbosity)
            hf_logging.enable_progress_bar()
