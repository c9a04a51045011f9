"""One-off model preparation hides third-party chatter unless asked (`tiergate serve -v`), and loses nothing on
failure."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator

import pytest

from tiergate_router.quiet import quiet_libraries


@pytest.fixture
def root_level() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    old = root.level
    yield root
    root.setLevel(old)


def _chatter() -> None:
    logging.getLogger("onnxruntime.quantization").info("Quantization parameters for tensor ...")
    logging.getLogger().warning("Please consider to run pre-processing before quantization")
    warnings.warn("Converting a tensor to a Python boolean might cause the trace to be incorrect", stacklevel=1)
    sys.stderr.write("Converting and de-quantizing GGUF tensors...: 100%\n")


def test_chatter_is_hidden_and_state_restored(root_level: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    root_level.setLevel(logging.WARNING)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries():
            _chatter()
    assert seen == []
    assert capsys.readouterr().err == ""
    assert root_level.level == logging.WARNING


def test_errors_still_reach_the_handlers(root_level: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    root_level.setLevel(logging.WARNING)
    with caplog.at_level(logging.WARNING), quiet_libraries():
        logging.getLogger("onnxruntime").error("the graph could not be loaded")
    assert "the graph could not be loaded" in caplog.text


def _failing_export() -> None:
    with quiet_libraries():
        sys.stderr.write("torch.onnx: unsupported operator aten::foo\n")
        raise RuntimeError("export failed")


def test_a_failure_writes_out_what_was_held_back(
    root_level: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    root_level.setLevel(logging.WARNING)
    with pytest.raises(RuntimeError, match="export failed"):
        _failing_export()
    assert "unsupported operator aten::foo" in capsys.readouterr().err


def test_verbose_shows_everything(root_level: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    root_level.setLevel(logging.INFO)  # what `tiergate serve -v` sets
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries():
            _chatter()
    assert len(seen) == 1
    assert "GGUF tensors" in capsys.readouterr().err
