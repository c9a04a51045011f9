"""KEDA's own ScaledObject CRD for the test bed, from KEDA's published Go module at a pinned release.

The operator's KEDA mode (spec.tiers[].autoscaling.mode KEDA) must be checked against the schema the KEDA project
ships, not a hand-written copy: `go mod download` fetches `github.com/kedacore/keda/v2` at KEDA_VERSION from the
Go module proxy, verified against the checksum database like any module, and the CRD is copied from its
`config/crd/bases/` into the tiergate cache (`<cache>/keda/<version>/`), so a second run needs no network. Only
the CRD is used: nothing of KEDA is built or run (the cluster tests check that the API server accepts the
operator's ScaledObjects; scaling itself is KEDA's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tiergate.cache import cache_root

from .build import _go_env
from .errors import BuildError

KEDA_MODULE = "github.com/kedacore/keda/v2"
# The newest KEDA release when this was written (2026-12); its CRDs declare keda.sh/v1alpha1, what the builders emit.
KEDA_VERSION = "v2.18.3"
SCALED_OBJECT_CRD = "keda.sh_scaledobjects.yaml"
SCALED_OBJECT_CRD_NAME = "scaledobjects.keda.sh"


def scaled_object_crd(cache: Path | None = None, version: str = KEDA_VERSION) -> Path:
    """Path of KEDA's ScaledObject CRD at `version`, downloading the module once. Raises BuildError when the Go
    module proxy cannot be reached and nothing is cached."""
    final = (cache or cache_root()) / "keda" / version / SCALED_OBJECT_CRD
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="keda-") as work:
        # Outside any module (an empty folder): `go mod download MODULE@VERSION` needs no go.mod there.
        proc = subprocess.run(
            ["go", "mod", "download", "-json", f"{KEDA_MODULE}@{version}"],
            cwd=work,
            env=_go_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    if proc.returncode != 0:
        raise BuildError(f"go mod download {KEDA_MODULE}@{version} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    try:
        source = Path(json.loads(proc.stdout)["Dir"]) / "config" / "crd" / "bases" / SCALED_OBJECT_CRD
    except (ValueError, KeyError) as e:
        raise BuildError(
            f"go mod download {KEDA_MODULE}@{version} printed no module folder: {proc.stdout[:500]}"
        ) from e
    if not source.is_file():
        raise BuildError(f"{KEDA_MODULE}@{version} has no config/crd/bases/{SCALED_OBJECT_CRD}")
    # Written under a temporary name first: an interrupted copy never leaves a file a later run would trust.
    partial = final.with_suffix(f".partial-{os.getpid()}")
    shutil.copyfile(source, partial)
    partial.replace(final)
    return final
