"""The package layering is written down as import-linter contracts in `.importlinter` (run by `make test` as
`lint-imports`): the shared API below the run-time routing package, below the offline toolchain and the router; the
operator and the router independent; nothing in the product imports the tests. What a contract cannot say is here."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_operator_folder_cannot_shadow_the_standard_library() -> None:
    import operator

    assert operator.__file__ is not None
    assert "site-packages" not in operator.__file__
    assert str(ROOT) not in operator.__file__
    assert not (ROOT / "operator" / "__init__.py").exists()
