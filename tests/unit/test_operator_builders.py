"""Pure builders: what each child object looks like for the sample policy and its variations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tiergate.api import naming
from tiergate.api.policy import RoutingPolicy, load_policy, parse_policy
from tiergate_operator import builders as b

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"


def policy(mutate: Any = None) -> RoutingPolicy:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update({"namespace": "team-a", "uid": "uid-123", "generation": 4})
    if mutate:
        mutate(doc)
    return parse_policy(doc)


def test_children_of_sample_are_complete_and_ordered() -> None:
    objs = b.build_children(policy())
    keys = [b.child_key(o) for o in objs]
    assert len(keys) == len(set(keys))
    names = {k for k in keys}
    for kind in ("Deployment", "Service", "PodDisruptionBudget"):
        for n in ("chat-tier-small", "chat-tier-large", "chat-router", "chat-reward"):
            assert (kind, n) in names
    for kind in ("ConfigMap", "ServiceAccount", "Role", "RoleBinding"):
        assert (kind, "chat-router") in names
    assert len(objs) == 16
    kinds = [o["kind"] for o in objs]
    assert kinds.index("ServiceAccount") < kinds.index("Deployment")
    assert kinds.index("ConfigMap") < kinds.index("Deployment")


def test_every_child_is_owned_labelled_and_namespaced() -> None:
    for o in b.build_children(policy()):
        md = o["metadata"]
        assert md["namespace"] == "team-a"
        (ref,) = md["ownerReferences"]
        assert ref == {
            "apiVersion": "tiergate.io/v1alpha1",
            "kind": "RoutingPolicy",
            "name": "chat",
            "uid": "uid-123",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert md["labels"][naming.POLICY_LABEL] == "chat"
        assert md["labels"]["app.kubernetes.io/managed-by"] == "tiergate-operator"
        assert md["labels"]["app.kubernetes.io/part-of"] == "tiergate"
        assert md["labels"]["app.kubernetes.io/instance"] == "chat"


def test_tier_deployment_gpu_placement_probes_and_security() -> None:
    p = policy()
    d = b.build_tier_deployment(p, p.spec.tier("large"))
    assert d["spec"]["replicas"] == 1
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert c["resources"]["limits"]["memory"] == "160Gi"
    assert pod["nodeSelector"] == {"tiergate.io/pool": "gpu-large"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert c["args"][:2] == ["--model", "Qwen/Qwen2.5-72B-Instruct"]
    assert c["args"][c["args"].index("--served-model-name") + 1] == "qwen2.5-72b"
    assert c["args"][-4:] == ["--tensor-parallel-size", "4", "--max-model-len", "16384"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    ann = d["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == "8000"
    sel = d["spec"]["selector"]["matchLabels"]
    assert sel == {naming.POLICY_LABEL: "chat", naming.COMPONENT_LABEL: "model-server", naming.TIER_LABEL: "large"}
    assert sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()


# The `restricted` Pod Security Standard's checks on a pod spec (kubernetes.io/docs/concepts/security/
# pod-security-standards), as the API server's PodSecurity admission applies them; the cluster test
# (test_operator_restricted_pods) shows the API server agrees.
_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            out.append(host)
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']}: {sorted(kinds)}")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    for c in [*(pod.get("initContainers") or []), *pod["containers"]]:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities not dropping ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities {caps['add']}")
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
            out.append(f"{name}: runAsNonRoot not true")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{name}: hostPort")
    return out


def _pods(p: RoutingPolicy) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in b.build_children(p) if o["kind"] == "Deployment"
    }


def test_every_pod_the_operator_creates_meets_the_restricted_standard() -> None:
    pods = _pods(policy())
    assert set(pods) == {"chat-tier-small", "chat-tier-large", "chat-router", "chat-reward"}
    for name, pod in pods.items():
        assert restricted_violations(pod) == [], name
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            # A numeric non-root UID: the kubelet refuses runAsNonRoot for an image whose USER is root or a name.
            assert c["securityContext"]["runAsUser"] > 0, name
    # The checker can fail: the engine pod as it was (root, no runAsNonRoot) is refused by it.
    old = _pods(policy())["chat-tier-small"]
    for sc in (old["securityContext"], old["containers"][0]["securityContext"]):
        sc.pop("runAsNonRoot")
    assert restricted_violations(old) == ["engine: runAsNonRoot not true"]


def test_engine_writes_only_to_emptydirs() -> None:
    """With a read-only root, every place vLLM writes is a volume: HOME and every cache variable under a mount."""
    p = policy()
    pod = _pods(p)["chat-tier-large"]
    (c,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": b.ENGINE_SHM_SIZE}
    assert "emptyDir" in vols[mounts["/tmp"]]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["USER"]  # getpass.getuser() for a UID without a passwd entry
    for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        under = [m for m in mounts if env[var] == m or env[var].startswith(m + "/")]
        assert under, f"{var}={env[var]} is on the read-only root"
        deepest = max(under, key=len)
        assert "emptyDir" in vols[mounts[deepest]], var
    # The big caches share the cache volume, not HOME's.
    for var in ("HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[var].startswith(b.ENGINE_CACHE + "/"), var
    # The reward model is the same kind of pod.
    assert _pods(p)["chat-reward"]["securityContext"] == pod["securityContext"]


def test_engine_env_of_the_user_wins() -> None:
    def user_env(doc: dict[str, Any]) -> None:
        doc["spec"]["tiers"][0]["engine"]["env"] = [
            {"name": "HOME", "value": "/models/home"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        ]

    (c,) = _pods(policy(user_env))["chat-tier-small"]["containers"]
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names))  # server-side apply refuses a list-map with a name twice
    env = {e["name"]: e for e in c["env"]}
    assert env["HOME"]["value"] == "/models/home"
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["USER"]["value"] == "vllm"


def test_tier_service_selects_the_tier_pods_only() -> None:
    p = policy()
    s = b.build_tier_service(p, p.spec.tier("small"))
    assert s["spec"]["selector"][naming.TIER_LABEL] == "small"
    assert s["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]


def test_autoscaler_owned_replicas_are_left_out() -> None:
    def auto(doc: dict[str, Any]) -> None:
        doc["spec"]["tiers"][0]["autoscaling"] = {"mode": "External"}

    p = policy(auto)
    d = b.build_tier_deployment(p, p.spec.tier("small"))
    assert "replicas" not in d["spec"]
    # The other tier is still operator-managed.
    assert b.build_tier_deployment(p, p.spec.tier("large"))["spec"]["replicas"] == 1


def test_explicit_node_selector_and_toleration_override_pool_conventions() -> None:
    def custom(doc: dict[str, Any]) -> None:
        t = doc["spec"]["tiers"][1]
        t["nodeSelector"] = {"tiergate.io/pool": "h200", "zone": "b"}
        t["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "h200", "effect": "NoSchedule"}]

    p = policy(custom)
    pod = b.build_tier_deployment(p, p.spec.tier("large"))["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"tiergate.io/pool": "h200", "zone": "b"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "h200", "effect": "NoSchedule"}
    ]


def test_cpu_only_tier_gets_no_gpu_toleration() -> None:
    def cpu(doc: dict[str, Any]) -> None:
        doc["spec"]["tiers"][0]["resources"] = {"gpus": 0, "cpu": "2"}
        doc["spec"]["tiers"][0]["pool"] = "cpu"

    p = policy(cpu)
    pod = b.build_tier_deployment(p, p.spec.tier("small"))["spec"]["template"]["spec"]
    assert "tolerations" not in pod
    assert "nvidia.com/gpu" not in str(pod["containers"][0].get("resources"))


def test_external_tier_deploys_nothing() -> None:
    def ext(doc: dict[str, Any]) -> None:
        doc["spec"]["tiers"].append(
            {
                "name": "frontier",
                "model": "gpt-5",
                "endpoint": {"url": "https://api.example.com/v1"},
                "price": {"inputPerMillion": "1.25", "outputPerMillion": 10},
            }
        )

    p = policy(ext)
    names = {o["metadata"]["name"] for o in b.build_children(p)}
    assert not any("frontier" in n for n in names)
    with pytest.raises(b.BuildError):
        b.build_tier_deployment(p, p.spec.tier("frontier"))


def test_router_deployment_is_restricted_and_mounts_policy_and_classifier() -> None:
    p = policy()
    d = b.build_router_deployment(p)
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert d["spec"]["replicas"] == 2
    assert pod["serviceAccountName"] == "chat-router"
    assert pod["nodeSelector"] == {"tiergate.io/pool": "cpu"}
    assert "tolerations" not in pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["command"] == ["tiergate"]
    assert c["args"] == [
        "serve",
        "--policy",
        naming.POLICY_FILE,
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--grpc-port",
        "50051",
        "--discovery",
        "on",
    ]

    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["policy"] == naming.POLICY_MOUNT_DIR
    assert mounts["classifier"] == naming.CLASSIFIER_MOUNT_DIR
    vols = {v["name"]: v for v in pod["volumes"]}
    # The operator's checked copy of the policy's ConfigMap (chat-router-artifact), under the key the policy names.
    assert vols["classifier"]["configMap"] == {
        "name": "chat-router-classifier",
        "items": [{"key": "artifact.json", "path": "router.json"}],
    }
    # Ready: the overall health, SERVING only while some tier has an endpoint; alive: a service always SERVING.
    assert c["readinessProbe"]["grpc"] == {"port": 50051}
    assert c["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness"}


def test_router_args_parse_with_the_routers_own_cli() -> None:
    """The flags the operator writes are ones `tiergate serve` accepts (its real argument parser)."""
    import argparse

    from tiergate_router import cmd_serve

    parser = argparse.ArgumentParser()
    cmd_serve.configure(parser)
    args = parser.parse_args(b.router_args(policy())[1:])
    assert str(args.policy) == naming.POLICY_FILE
    assert args.port == 8080
    assert args.grpc_port == 50051
    assert args.host == "0.0.0.0"


def test_router_configmap_holds_a_loadable_policy() -> None:
    p = policy()
    cm = b.build_router_configmap(p)
    text = cm["data"][naming.POLICY_FILE_KEY]
    again = load_policy(text)
    assert again.spec == p.spec
    assert again.metadata.namespace == "team-a"
    assert "uid" not in yaml.safe_load(text)["metadata"]


def test_router_rbac_reads_endpointslices_only() -> None:
    p = policy()
    role = b.build_router_role(p)
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    rb = b.build_router_rolebinding(p)
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "chat-router", "namespace": "team-a"}]


def test_reward_model_on_its_pool() -> None:
    p = policy()
    d = b.build_reward_deployment(p)
    pod = d["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"tiergate.io/pool": "reward"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--runner" in pod["containers"][0]["args"]


def test_no_best_of_n_means_no_reward_children() -> None:
    p = policy(lambda doc: doc["spec"].pop("bestOfN"))
    assert not any(o["metadata"]["name"] == "chat-reward" for o in b.build_children(p))
    with pytest.raises(b.BuildError):
        b.build_reward_deployment(p)


def test_builders_are_deterministic_and_need_uid() -> None:
    assert b.build_children(policy()) == b.build_children(policy())
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"]["namespace"] = "x"
    with pytest.raises(b.BuildError, match="uid"):
        b.build_children(parse_policy(doc))


def test_model_change_changes_only_that_tier() -> None:
    before = {b.child_key(o): o for o in b.build_children(policy())}

    def change(doc: dict[str, Any]) -> None:
        doc["spec"]["tiers"][0]["model"] = "Qwen/Qwen3-8B"

    after = {b.child_key(o): o for o in b.build_children(policy(change))}
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {("Deployment", "chat-tier-small"), ("ConfigMap", "chat-router")}


def test_router_reads_the_policy_document_the_operator_writes(tmp_path: Path) -> None:
    """End to end between the two components through the file the ConfigMap mounts."""
    from tiergate_router.config import load_policy_file

    def knob(doc: dict[str, Any]) -> None:
        doc["spec"]["router"].pop("targetStrongShareBasisPoints")
        doc["spec"]["router"]["thresholdBasisPoints"] = 4200

    p = policy(knob)
    f = tmp_path / naming.POLICY_FILE_KEY
    f.write_text(b.build_router_configmap(p)["data"][naming.POLICY_FILE_KEY])
    cfg = load_policy_file(f)
    assert [t.name for t in cfg.tiers] == ["small", "large"]
    assert [t.served_model for t in cfg.tiers] == ["qwen2.5-7b", "qwen2.5-72b"]
    assert cfg.tiers[0].base_urls == ("http://chat-tier-small.team-a.svc:8000/v1",)
    assert cfg.thresholds_bp == (4200,)
    assert cfg.fallback_order == ("large", "small")
    assert str(cfg.classifier_artifact) == naming.classifier_path("router.json")
