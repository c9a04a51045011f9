"""Build the control-plane binaries from pinned Go module versions, once, into a versioned cache.

Why build from source: this machine kind has no Docker engine (no kind) and no way to download release
binaries, but it reaches the Go module proxy. A cache entry is a directory named after the component and its
version; it is created by renaming a finished temporary directory, so an interrupted or failed build never
leaves an entry that a later run would trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from tiergate.cache import cache_root

from . import versions
from .errors import BuildError

# Build tags and flags that upstream's release builds use (hack/lib/golang.sh); `notest` drops test-only
# code, `grpcnotrace` keeps grpc's tracing out of the binaries.
_K8S_TAGS = "selinux,notest,grpcnotrace"

# kwok does nothing to pods without stages. The "fast" set moves a scheduled pod straight to Running and Ready
# (the "general" set waits for an Initialized condition that only a real kubelet sets), and the lease
# heartbeat keeps nodes Ready the way real kubelets do. Paths are relative to the module's kustomize/stage/.
_KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
)


def default_cache_dir() -> Path:
    """The tiergate cache root (`tiergate.cache`): outside the repository, so a fresh clone (CI) reuses what an
    earlier run on the machine built."""
    return cache_root()


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # The toolchain on the machine is the one the versions were verified with; never download another.
    env.setdefault("GOTOOLCHAIN", "local")
    env["CGO_ENABLED"] = "0"
    env.setdefault("GOFLAGS", "-buildvcs=false")
    return env


def _run(cmd: list[str], cwd: Path, log: Path) -> None:
    with log.open("ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=_go_env(), stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise BuildError(f"{' '.join(cmd[:3])} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))


def _download_json(module: str, workdir: Path, log: Path) -> dict[str, str]:
    proc = subprocess.run(
        ["go", "mod", "download", "-json", module],
        cwd=workdir,
        env=_go_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        log.write_text(proc.stdout + proc.stderr)
        raise BuildError(f"go mod download {module} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    info: dict[str, str] = json.loads(proc.stdout)
    return info


def staging_modules(gomod_text: str) -> list[str]:
    """Names of the staging modules that k8s.io/kubernetes maps to `./staging/src/...` in its go.mod.

    Those replaces only apply when k8s.io/kubernetes is the main module, so a wrapper module must repeat them,
    pointing each at its published version.
    """
    mods = []
    for line in gomod_text.splitlines():
        if "=> ./staging/src/" in line:
            name = line.split("=>")[0].strip().split()[0]
            mods.append(name)
    if not mods:
        raise BuildError("no staging replaces found in k8s.io/kubernetes go.mod; has the layout changed?")
    return sorted(set(mods))


def _ldflags_k8s() -> str:
    ver = versions.KUBERNETES
    major, minor = ver.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    # Without a stamped version the server reports v0.0.0-master and Helm's kubeVersion checks misfire.
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.gitVersion={ver}", f"-X {pkg}.gitMajor={major}", f"-X {pkg}.gitMinor={minor}"]
        flags += [f"-X {pkg}.gitTreeState=clean"]
    return " ".join(flags)


def _write_wrapper(
    work: Path, module: str, requires: dict[str, str], replaces: dict[str, str], imports: list[str]
) -> None:
    work.mkdir(parents=True, exist_ok=True)
    lines = [f"module {module}", "", "go 1.26", "", "require ("]
    lines += [f"\t{m} {v}" for m, v in requires.items()]
    lines.append(")")
    if replaces:
        lines += ["", "replace ("]
        lines += [f"\t{m} => {m} {v}" for m, v in replaces.items()]
        lines.append(")")
    (work / "go.mod").write_text("\n".join(lines) + "\n")
    tools = [
        "//go:build tools",
        "",
        "// Package tools pins the commands this wrapper builds.",
        "package tools",
        "",
        "import (",
    ]
    tools += [f'\t_ "{i}"' for i in imports]
    tools.append(")")
    (work / "tools.go").write_text("\n".join(tools) + "\n")


def _build_kubernetes(work: Path, out: Path, log: Path) -> None:
    probe = work / "probe"
    probe.mkdir(parents=True, exist_ok=True)
    (probe / "go.mod").write_text("module probe\n\ngo 1.26\n")
    info = _download_json(f"k8s.io/kubernetes@{versions.KUBERNETES}", probe, log)
    staging = staging_modules(Path(info["GoMod"]).read_text())
    cmds = [
        f"k8s.io/kubernetes/cmd/{b}" for b in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
    ]
    wrap = work / "wrapper"
    _write_wrapper(
        wrap,
        "tiergate.local/k8sbuild",
        {"k8s.io/kubernetes": versions.KUBERNETES},
        {m: versions.KUBERNETES_STAGING for m in staging},
        cmds,
    )
    _run(["go", "mod", "tidy"], wrap, log)
    _run(
        ["go", "build", "-trimpath", "-tags", _K8S_TAGS, "-ldflags", _ldflags_k8s(), "-o", str(out) + "/", *cmds],
        wrap,
        log,
    )


def _build_etcd(work: Path, out: Path, log: Path) -> None:
    wrap = work / "wrapper"
    _write_wrapper(
        wrap,
        "tiergate.local/etcdbuild",
        {"go.etcd.io/etcd/server/v3": versions.ETCD},
        {},
        ["go.etcd.io/etcd/server/v3"],
    )
    _run(["go", "mod", "tidy"], wrap, log)
    _run(
        ["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "etcd"), "go.etcd.io/etcd/server/v3"],
        wrap,
        log,
    )


def _go_install(pkg: str, version: str, work: Path, out: Path, log: Path) -> None:
    env_out = dict(GOBIN=str(out))
    with log.open("ab") as f:
        f.write(f"$ GOBIN={out} go install {pkg}@{version}\n".encode())
        f.flush()
        proc = subprocess.run(
            ["go", "install", "-trimpath", "-ldflags", "-s -w", f"{pkg}@{version}"],
            cwd=work,
            env={**_go_env(), **env_out},
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise BuildError(f"go install {pkg}@{version} failed; log {log}:\n" + "\n".join(tail))


def _build_kwok(work: Path, out: Path, log: Path) -> None:
    _go_install("sigs.k8s.io/kwok/cmd/kwok", versions.KWOK, work, out, log)
    # kwok does nothing to pods without stages; the stage files ship in the module, not in the binary.
    info = _download_json(f"sigs.k8s.io/kwok@{versions.KWOK}", work, log)
    src = Path(info["Dir"]) / "kustomize" / "stage"
    stages = out / "stages"
    stages.mkdir()
    for rel in _KWOK_STAGES:
        if not (src / rel).is_file():
            raise BuildError(f"kwok stage {rel} not found under {src}")
        shutil.copyfile(src / rel, stages / Path(rel).name)


def _build_helm(work: Path, out: Path, log: Path) -> None:
    _go_install("helm.sh/helm/v3/cmd/helm", versions.HELM, work, out, log)


def _build_prometheus_adapter(work: Path, out: Path, log: Path) -> None:
    # `go install ...@v0.12.0` fails: the proxy refuses this module's version list (403), which `go install`
    # reads for deprecation notices. A wrapper module requiring the exact version never asks for that list.
    cmd = "sigs.k8s.io/prometheus-adapter/cmd/adapter"
    wrap = work / "wrapper"
    _write_wrapper(
        wrap, "tiergate.local/adapterbuild", {"sigs.k8s.io/prometheus-adapter": versions.PROMETHEUS_ADAPTER}, {}, [cmd]
    )
    _run(["go", "mod", "tidy"], wrap, log)
    _run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "prometheus-adapter"), cmd], wrap, log)


# The two scalers whose SDKs the module proxy refuses (403: github.com/newrelic/newrelic-client-go/v2 and
# github.com/solarwinds/swo-sdk-go): their files go, and their cases in the scalers' factory return an error naming
# them, so a ScaledObject with such a trigger is refused by this build's operator, not silently ignored.
_KEDA_LEFT_OUT = {"newrelic": "NewNewRelicScaler", "solarwinds": "NewSolarWindsScaler"}


def trim_keda_source(src: Path) -> None:
    """Leave the scalers of _KEDA_LEFT_OUT out of a writable copy of KEDA's module at `src`: their files go, and the
    factory's calls to their constructors become errors naming them. Raises BuildError when the source is not laid
    out as this recipe expects (another KEDA version), rather than building something else."""
    factory = src / "pkg" / "scaling" / "scalers_builder.go"
    if not factory.is_file():
        raise BuildError(f"KEDA {versions.KEDA}: no {factory.relative_to(src)} to leave scalers out of")
    text = factory.read_text()
    calls = {scaler: f"return scalers.{constructor}(config)" for scaler, constructor in _KEDA_LEFT_OUT.items()}
    for call in calls.values():
        if call not in text:
            raise BuildError(f"KEDA {versions.KEDA}: {factory.name} has no `{call}` to leave out")
    for scaler, call in calls.items():
        for gone in (src / "pkg" / "scalers").glob(f"{scaler}_scaler*.go"):
            gone.unlink()
        text = text.replace(call, f'return nil, fmt.Errorf("scaler {scaler} is not in this build of KEDA")')
    factory.write_text(text)


def _build_keda(work: Path, out: Path, log: Path) -> None:
    info = _download_json(f"github.com/kedacore/keda/v2@{versions.KEDA}", work, log)
    src = work / "keda"
    # The module cache is read-only: build a writable copy.
    shutil.copytree(info["Dir"], src)
    for f in src.rglob("*"):
        f.chmod(f.stat().st_mode | 0o200)
    trim_keda_source(src)
    # -mod=mod: go.sum no longer lists exactly what the trimmed package graph needs.
    for binary, cmd in (("keda-operator", "./cmd/operator"), ("keda-metrics-apiserver", "./cmd/adapter")):
        _run(["go", "build", "-mod=mod", "-trimpath", "-ldflags", "-s -w", "-o", str(out / binary), cmd], src, log)


_BUILDERS = {
    "kubernetes": _build_kubernetes,
    "etcd": _build_etcd,
    "kwok": _build_kwok,
    "helm": _build_helm,
    "prometheus-adapter": _build_prometheus_adapter,
    "keda": _build_keda,
}


def component_dir(cache: Path, comp: versions.Component) -> Path:
    return cache / "bin" / comp.key


def is_built(cache: Path, comp: versions.Component) -> bool:
    d = component_dir(cache, comp)
    return all((d / b).is_file() and os.access(d / b, os.X_OK) for b in comp.binaries)


def ensure_component(cache: Path, comp: versions.Component, say: Callable[[str], None]) -> Path:
    final = component_dir(cache, comp)
    if is_built(cache, comp):
        return final
    if final.exists():
        # An entry without all its binaries was not produced by this code's atomic rename; don't trust it.
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    logs = cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{comp.key}.log"
    log.write_text("")
    name = comp.key.split("-v")[0]
    t0 = time.monotonic()
    say(f"building {comp.key} (log: {log}) ...")
    with tempfile.TemporaryDirectory(prefix=f".{comp.key}.", dir=final.parent) as tmp:
        tmpdir = Path(tmp)
        out, work = tmpdir / "out", tmpdir / "work"
        out.mkdir()
        work.mkdir()
        _BUILDERS[name](work, out, log)
        missing = [b for b in comp.binaries if not (out / b).is_file()]
        if missing:
            raise BuildError(f"{comp.key}: build finished without {missing}; log {log}")
        (out / "BUILD-INFO").write_text(f"{comp.key}\nbuilt {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        os.rename(out, final)
    say(f"built {comp.key} in {time.monotonic() - t0:.0f}s")
    return final


class Say:
    def __call__(self, msg: str) -> None:
        print(f"[devcluster] {msg}", file=sys.stderr, flush=True)


def ensure_all(cache: Path | None = None, say: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Build whatever is missing; return the directory holding each binary, by binary name.

    Holds an exclusive lock on the cache while it checks and builds, so two runs at once (two terminals, a test
    session beside `make run`) build each component once: the second waits and then finds it built.
    """
    cache = cache or default_cache_dir()
    say = say or Say()
    with _cache_lock(cache, say):
        return _ensure_all_locked(cache, say)


def ensure_keda(cache: Path | None = None, say: Callable[[str], None] | None = None) -> dict[str, Path]:
    """KEDA's binaries (versions.KEDA_COMPONENT) by name, built once into the cache, under the same lock as
    ensure_all."""
    cache = cache or default_cache_dir()
    say = say or Say()
    comp = versions.KEDA_COMPONENT
    with _cache_lock(cache, say):
        d = ensure_component(cache, comp, say)
    return {b: d / b for b in comp.binaries}


@contextlib.contextmanager
def _cache_lock(cache: Path, say: Callable[[str], None]) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".build.lock").open("w") as lock:
        if not _try_lock(lock):
            say("another build is running; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _try_lock(f: IO[str]) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _ensure_all_locked(cache: Path, say: Callable[[str], None]) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for comp in versions.COMPONENTS:
        d = ensure_component(cache, comp, say)
        for b in comp.binaries:
            paths[b] = d / b
        if (d / "stages").is_dir():
            paths["kwok-stages"] = d / "stages"
    return paths
