"""Pure builders: RoutingPolicy -> the Kubernetes objects it stands for. No I/O, no clients, unit-tested.

Every object carries an owner reference to its policy (garbage collection deletes it with the policy), the
`app.kubernetes.io/*` labels, and `tiergate.io/policy` (+ `tiergate.io/tier`) labels that the operator uses to
find its children again (pruning removed tiers, computing status) and the router uses to discover tier pods.

The objects are written as server-side-apply configurations: only fields the operator has an opinion about,
so fields others own (an autoscaler's replicas, a mutating webhook's sidecar) are left alone.
"""

from __future__ import annotations

from typing import Any

import yaml

from tiergate.api import naming
from tiergate.api.policy import (
    API_VERSION,
    KIND,
    AutoscalingMode,
    EnvVar,
    Placement,
    RewardModel,
    RoutingPolicy,
    Tier,
)

from .autoscaling import build_tier_hpa, build_tier_scaled_object
from .classifier import (
    CLASSIFIER_SHA_ANNOTATION,
    COPY_KEY,
    ROUTER_INPUTS_ANNOTATION,
    ClassifierCopy,
    canary_copy_name,
    copy_name,
    router_inputs_digest,
)

Obj = dict[str, Any]

PART_OF = "tiergate"
ROUTER_APP = "tiergate-router"
ENGINE_APP = "vllm"
ENGINE_CONTAINER = "engine"
ROUTER_CONTAINER = "router"

# vLLM loads weights before /health answers; a 70B model from a network volume can take many minutes. The startup
# probe allows 30 minutes (180 x 10 s) so that slow loads are not killed, and liveness takes over afterwards.
ENGINE_STARTUP_PERIOD_SECONDS = 10
ENGINE_STARTUP_FAILURES = 180
# vLLM drains in-flight requests on SIGTERM; generations of a few thousand tokens finish well within a minute.
ENGINE_TERMINATION_GRACE_SECONDS = 60
# Tensor-parallel workers exchange tensors through /dev/shm; the container default of 64 MiB is far too small.
ENGINE_SHM_SIZE = "16Gi"
ROUTER_UID = 65532  # the conventional "nonroot" user of distroless images
# The vllm/vllm-openai image has no USER: it runs as root unless told otherwise, and `runAsNonRoot` alone would make
# the kubelet refuse to start it (it cannot prove a non-numeric or absent user is not root). So the pod names a
# numeric UID. Any non-zero one works: the image has no passwd entry for it, and what such an entry would give
# (a home directory, a user name) is filled in by ENGINE_HOME and the USER variable below.
ENGINE_UID = 1001
# HOME of the engine, an emptyDir: with a read-only root nothing else under / is writable, and vLLM and its libraries
# write under $HOME at start (~/.config/vllm, ~/.triton, ~/.cache).
ENGINE_HOME = "/home/vllm"
ENGINE_CACHE = f"{ENGINE_HOME}/.cache"


class BuildError(ValueError):
    """The policy cannot be turned into objects (it lacks what the API server would have set)."""


# --- metadata ---------------------------------------------------------------------------------------------------


def owner_reference(policy: RoutingPolicy) -> Obj:
    """Controller reference to the policy. blockOwnerDeletion makes foreground deletion of the policy wait for its
    children, so `kubectl delete --cascade=foreground` returns only when they are gone."""
    uid = policy.metadata.uid
    if not uid:
        raise BuildError(f"RoutingPolicy {policy.name} has no metadata.uid (not read from the API server?)")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": policy.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _namespace(policy: RoutingPolicy) -> str:
    if not policy.namespace:
        raise BuildError(f"RoutingPolicy {policy.name} has no metadata.namespace")
    return policy.namespace


def selector_labels(policy: RoutingPolicy, component: str, tier: str | None = None) -> dict[str, str]:
    """The immutable part: a Deployment's selector can never change, so it holds only identity, never versions."""
    labels = {naming.POLICY_LABEL: policy.name, naming.COMPONENT_LABEL: component}
    if tier is not None:
        labels[naming.TIER_LABEL] = tier
    return labels


def common_labels(policy: RoutingPolicy, component: str, app: str, tier: str | None = None) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/instance": policy.name,
        "app.kubernetes.io/part-of": PART_OF,
        naming.MANAGED_BY_LABEL: naming.MANAGED_BY,
        **selector_labels(policy, component, tier),
    }


def _meta(policy: RoutingPolicy, name: str, labels: dict[str, str]) -> Obj:
    return {
        "name": name,
        "namespace": _namespace(policy),
        "labels": dict(labels),
        "ownerReferences": [owner_reference(policy)],
    }


# --- pod pieces -------------------------------------------------------------------------------------------------


def node_selector(p: Placement) -> dict[str, str]:
    """The pool label first, then explicit entries (which win, so any tier can override the pool convention)."""
    out: dict[str, str] = {}
    if p.pool:
        out[naming.POOL_LABEL] = p.pool
    out.update(p.node_selector)
    return out


def tolerations(p: Placement, gpus: int) -> list[Obj]:
    out: list[Obj] = [t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in p.tolerations]
    if gpus > 0 and not any(t.get("key") == naming.GPU_TAINT_KEY for t in out):
        # GPU nodes are tainted so that only GPU workloads land there; ours are GPU workloads.
        out.append({"key": naming.GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"})
    return out


def _placement(p: Placement, gpus: int) -> Obj:
    spec: Obj = {}
    sel = node_selector(p)
    if sel:
        spec["nodeSelector"] = sel
    tol = tolerations(p, gpus)
    if tol:
        spec["tolerations"] = tol
    if p.affinity:
        spec["affinity"] = dict(p.affinity)
    return spec


def _env(env: list[EnvVar]) -> list[Obj]:
    return [e.model_dump(by_alias=True, exclude_none=True, mode="json") for e in env]


def _resources(gpus: int, cpu: str | None, memory: str | None) -> Obj:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if gpus:
        # Extended resources must have requests == limits; setting both keeps that explicit.
        requests[naming.GPU_RESOURCE] = limits[naming.GPU_RESOURCE] = str(gpus)
    if cpu:
        requests["cpu"] = cpu
    if memory:
        # Memory limit = request: an LLM server that outgrows its request is better restarted than OOM-killing
        # its neighbours.
        requests["memory"] = limits["memory"] = memory
    out: Obj = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _container_security(*, uid: int) -> Obj:
    """What the `restricted` Pod Security Standard asks of every container, for one that runs as `uid`, with a
    read-only root filesystem (whatever it writes goes to an emptyDir the pod names)."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
    }


def _pod_security(uid: int) -> Obj:
    """The pod-level half. fsGroup makes a writable PersistentVolumeClaim (a model cache) writable by `uid`;
    OnRootMismatch skips the recursive chown of a volume already owned by it (a model volume holds hundreds of GB)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def engine_env(user_env: list[Obj]) -> list[Obj]:
    """The environment a non-root vLLM needs, then the user's (`engine.env`), which wins: a name the user sets is
    left out of ours (server-side apply refuses a list with one name twice).

    - HOME: the image's is /root, unwritable for ENGINE_UID; ENGINE_HOME is an emptyDir.
    - USER: torch (inductor, dynamo) asks `getpass.getuser()` for its cache paths, which raises KeyError for a UID
      without a passwd entry unless USER (or LOGNAME) is set.
    - XDG_CACHE_HOME, HF_HOME, VLLM_CACHE_ROOT, TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR: every cache on the one
      `cache` emptyDir (model downloads and compiled kernels, gigabytes), not on HOME's; named explicitly because
      Triton's default is ~/.triton and inductor's is /tmp, and a cache split across volumes is sized nowhere."""
    ours = {
        "HOME": ENGINE_HOME,
        "USER": "vllm",
        "XDG_CACHE_HOME": ENGINE_CACHE,
        "HF_HOME": f"{ENGINE_CACHE}/huggingface",
        "VLLM_CACHE_ROOT": f"{ENGINE_CACHE}/vllm",
        "TRITON_CACHE_DIR": f"{ENGINE_CACHE}/triton",
        "TORCHINDUCTOR_CACHE_DIR": f"{ENGINE_CACHE}/torchinductor",
    }
    taken = {str(e.get("name")) for e in user_env}
    return [{"name": k, "value": v} for k, v in ours.items() if k not in taken] + list(user_env)


def _http_probe(path: str, period: int, failures: int, timeout: int = 5) -> Obj:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def _scrape_annotations(port: int) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def _engine_pod(
    *,
    image: str,
    model: str,
    served_name: str,
    port: int,
    extra_args: list[str],
    env: list[Obj],
    resources: Obj,
    placement: Obj,
    volume_mounts: list[Obj],
    volumes: list[Obj],
) -> Obj:
    """A vLLM OpenAI-server pod that the `restricted` Pod Security Standard admits: a numeric non-root UID
    (ENGINE_UID says why one is needed), no privilege escalation, no capabilities, RuntimeDefault seccomp, and a
    read-only root filesystem. vLLM writes at start, so each place it writes is an emptyDir:

    - home (ENGINE_HOME): HOME; ~/.config/vllm (usage stats), ~/.triton and other small per-user files.
    - cache (ENGINE_CACHE): model downloads (HF_HOME) and compiled kernels (torch.compile, Triton, inductor), which
      can reach the model's size: unbounded, like the image's own /root/.cache was.
    - tmp (/tmp): Python's tempfile, multiprocessing, vLLM's IPC files, inductor's precompiled headers (about
      150 MB measured with vLLM 0.32 on CPU, scripts/engine_restricted_check.py) and Ray's session files.
    - shm (/dev/shm, in memory): NCCL and torch multiprocessing exchange tensors through it (ENGINE_SHM_SIZE).
    """
    container: Obj = {
        "name": ENGINE_CONTAINER,
        "image": image,
        "args": [
            "--model",
            model,
            "--served-model-name",
            served_name,
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            *extra_args,
        ],
        "env": engine_env(env),
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "startupProbe": _http_probe("/health", ENGINE_STARTUP_PERIOD_SECONDS, ENGINE_STARTUP_FAILURES),
        "readinessProbe": _http_probe("/health", 5, 3),
        "livenessProbe": _http_probe("/health", 15, 4),
        "securityContext": _container_security(uid=ENGINE_UID),
        "volumeMounts": [
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "home", "mountPath": ENGINE_HOME},
            {"name": "cache", "mountPath": ENGINE_CACHE},
            {"name": "tmp", "mountPath": "/tmp"},
            *volume_mounts,
        ],
    }
    if resources:
        container["resources"] = resources
    return {
        "automountServiceAccountToken": False,  # a model server never talks to the API server
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": ENGINE_TERMINATION_GRACE_SECONDS,
        "securityContext": _pod_security(ENGINE_UID),
        **placement,
        "containers": [container],
        "volumes": [
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": ENGINE_SHM_SIZE}},
            {"name": "home", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            *volumes,
        ],
    }


def _deployment(
    policy: RoutingPolicy,
    name: str,
    labels: dict[str, str],
    selector: dict[str, str],
    replicas: int | None,
    pod_spec: Obj,
    pod_annotations: dict[str, str],
) -> Obj:
    spec: Obj = {
        "selector": {"matchLabels": selector},
        # Keep serving capacity during a rollout: a new replica must be Ready before an old one goes. Costs one
        # replica's worth of spare GPUs while rolling.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {"metadata": {"labels": dict(labels), "annotations": pod_annotations}, "spec": pod_spec},
    }
    if replicas is not None:
        spec = {"replicas": replicas, **spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(policy, name, labels), "spec": spec}


def _service(
    policy: RoutingPolicy, name: str, labels: dict[str, str], selector: dict[str, str], ports: list[Obj]
) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(policy, name, labels),
        "spec": {"type": "ClusterIP", "selector": selector, "ports": ports},
    }


def _pdb(policy: RoutingPolicy, name: str, labels: dict[str, str], selector: dict[str, str]) -> Obj:
    """maxUnavailable 1 (not minAvailable): a drain can always make progress, even for a one-replica tier."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(policy, name, labels),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }


# --- tiers ------------------------------------------------------------------------------------------------------


def tier_replicas(tier: Tier) -> int | None:
    """None when an autoscaler owns the count (any autoscaling mode): the field is then absent from our apply, so
    server-side apply never takes it back from the autoscaler."""
    if tier.autoscaled:
        return None
    return tier.replicas.min


def build_tier_deployment(policy: RoutingPolicy, tier: Tier) -> Obj:
    if tier.external:
        raise BuildError(f"tier {tier.name} has an external endpoint; nothing to deploy")
    name = naming.tier_name(policy.name, tier.name)
    labels = common_labels(policy, naming.COMPONENT_TIER, ENGINE_APP, tier.name)
    mounts: list[Obj] = []
    volumes: list[Obj] = []
    if tier.model_volume is not None:
        mv = tier.model_volume
        mounts.append({"name": "model", "mountPath": mv.mount_path, "readOnly": mv.read_only})
        volumes.append(
            {"name": "model", "persistentVolumeClaim": {"claimName": mv.claim_name, "readOnly": mv.read_only}}
        )
    pod = _engine_pod(
        image=tier.engine.image,
        model=tier.model,
        served_name=tier.model_name,
        port=tier.engine.port,
        extra_args=list(tier.engine.args),
        env=_env(tier.engine.env),
        resources=_resources(tier.resources.gpus, tier.resources.cpu, tier.resources.memory),
        placement=_placement(tier, tier.resources.gpus),
        volume_mounts=mounts,
        volumes=volumes,
    )
    return _deployment(
        policy,
        name,
        labels,
        selector_labels(policy, naming.COMPONENT_TIER, tier.name),
        tier_replicas(tier),
        pod,
        _scrape_annotations(tier.engine.port),
    )


def build_tier_service(policy: RoutingPolicy, tier: Tier) -> Obj:
    return _service(
        policy,
        naming.tier_name(policy.name, tier.name),
        common_labels(policy, naming.COMPONENT_TIER, ENGINE_APP, tier.name),
        selector_labels(policy, naming.COMPONENT_TIER, tier.name),
        [{"name": "http", "port": tier.engine.port, "targetPort": "http", "protocol": "TCP"}],
    )


def build_tier_pdb(policy: RoutingPolicy, tier: Tier) -> Obj:
    return _pdb(
        policy,
        naming.tier_name(policy.name, tier.name),
        common_labels(policy, naming.COMPONENT_TIER, ENGINE_APP, tier.name),
        selector_labels(policy, naming.COMPONENT_TIER, tier.name),
    )


def build_tier_autoscaler(policy: RoutingPolicy, tier: Tier) -> Obj | None:
    """The tier's HPA (mode HPA) or ScaledObject (mode KEDA), named and labelled like its Deployment and owned by the
    policy; None without autoscaling or with mode External (someone else scales it). autoscaling.py builds them."""
    if tier.external or tier.autoscaling is None or tier.autoscaling.mode is AutoscalingMode.EXTERNAL:
        return None
    meta = _meta(
        policy,
        naming.autoscaler_name(policy.name, tier.name),
        common_labels(policy, naming.COMPONENT_TIER, ENGINE_APP, tier.name),
    )
    if tier.autoscaling.mode is AutoscalingMode.HPA:
        return build_tier_hpa(policy, tier, meta)
    return build_tier_scaled_object(policy, tier, meta)


# --- router -----------------------------------------------------------------------------------------------------


def _router_labels(policy: RoutingPolicy) -> dict[str, str]:
    return common_labels(policy, naming.COMPONENT_ROUTER, ROUTER_APP)


def router_policy_document(policy: RoutingPolicy) -> str:
    """What the router reads: the policy manifest with defaults filled in, minus server-side metadata."""
    doc = policy.to_manifest()
    doc["metadata"] = {"name": policy.name, "namespace": _namespace(policy)}
    if policy.metadata.generation is not None:
        doc["metadata"]["generation"] = policy.metadata.generation
    # libyaml's emitter when present: the pure-Python one costs ~10 ms per policy, most of a reconcile's CPU.
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(doc, Dumper=dumper, sort_keys=False)


def build_router_configmap(policy: RoutingPolicy) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(policy, naming.router_name(policy.name), _router_labels(policy)),
        "data": {naming.POLICY_FILE_KEY: router_policy_document(policy)},
    }


def build_classifier_configmap(policy: RoutingPolicy, classifier: ClassifierCopy, *, name: str | None = None) -> Obj:
    """The last good classifier artifact, copied from the ConfigMap the policy names (classifier.py says why).
    `name`: the copy's name (default: the primary artifact's, `copy_name`)."""
    meta = _meta(policy, name or copy_name(policy), _router_labels(policy))
    meta["annotations"] = {CLASSIFIER_SHA_ANNOTATION: classifier.sha256}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {COPY_KEY: classifier.content}}


def build_router_serviceaccount(policy: RoutingPolicy) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(policy, naming.router_name(policy.name), _router_labels(policy)),
        "automountServiceAccountToken": True,
    }


def build_router_role(policy: RoutingPolicy) -> Obj:
    """The router finds tier pods through EndpointSlices (per-pod balancing); that is all it may read."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(policy, naming.router_name(policy.name), _router_labels(policy)),
        "rules": [
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
        ],
    }


def build_router_rolebinding(policy: RoutingPolicy) -> Obj:
    name = naming.router_name(policy.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(policy, name, _router_labels(policy)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": _namespace(policy)}],
    }


def router_args(policy: RoutingPolicy) -> list[str]:
    """`tiergate serve` flags (tiergate_router.cmd_serve): listen on all addresses (its default is loopback), ports
    from the policy, the policy file the ConfigMap mounts (hot-reloaded), EndpointSlice discovery on.

    No `--reward-url` for best-of-N: the router derives the reward Service's URL from the policy file itself
    (`naming.reward_url` of the policy's name, namespace and `bestOfN.rewardModel.port`), the same function the
    operator reports in `status.rewardModel.endpoint`. A flag would be a second copy of what the file says, fixed
    for the pod's life: adding or removing bestOfN would then need a router rollout, and until it finished the old
    pods would hold a flag that the reloaded policy contradicts."""
    r = policy.spec.router
    return [
        "serve",
        "--policy",
        naming.POLICY_FILE,
        "--host",
        "0.0.0.0",
        "--port",
        str(r.http_port),
        "--grpc-port",
        str(r.grpc_port),
        "--discovery",
        "on",
    ]


def _api_key_env(policy: RoutingPolicy) -> list[Obj]:
    """External tiers' API keys, from their Secrets, as the environment variables the router reads
    (`naming.api_key_env`). Environment rather than a volume: the key never lands on disk in the pod; rotating it
    takes a router rollout."""
    out: list[Obj] = []
    for t in policy.spec.tiers:
        ref = t.endpoint.api_key_secret_ref if t.endpoint is not None else None
        if ref is not None:
            out.append(
                {"name": naming.api_key_env(t.name), "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
            )
    return out


def _tenant_keys_volume(policy: RoutingPolicy) -> list[Obj]:
    """The tenants' API keys as one projected volume, a file per tenant named after it (what the router reads:
    `naming.TENANT_KEYS_DIR`/<tenant>). A volume, not environment variables as for external tiers: the kubelet
    rewrites a mounted Secret when it changes, so a rotated key takes effect without a restart, and the router needs
    no permission to read Secrets. `optional`: a tenant whose Secret is missing is refused, not the router stopped."""
    if not policy.spec.tenants:
        return []
    sources = [
        {
            "secret": {
                "name": t.api_key_secret_ref.name,
                "items": [{"key": t.api_key_secret_ref.key, "path": t.name}],
                "optional": True,
            }
        }
        for t in policy.spec.tenants
    ]
    # 0440 with the pod's fsGroup: readable by the router's group, by nobody else.
    return [{"name": "tenant-keys", "projected": {"sources": sources, "defaultMode": 0o440}}]


def _tenant_keys_mount(policy: RoutingPolicy) -> list[Obj]:
    if not policy.spec.tenants:
        return []
    return [{"name": "tenant-keys", "mountPath": naming.TENANT_KEYS_DIR, "readOnly": True}]


def build_router_deployment(
    policy: RoutingPolicy, classifier: ClassifierCopy | None = None, canary: ClassifierCopy | None = None
) -> Obj:
    """The router. A classifier ConfigMap is mounted from the operator's checked copy (`classifier`, the last good
    artifact; None before any was good, and the pod waits for the copy), under the key the policy names; a canary
    ConfigMap likewise from its copy (`canary`) at naming.CANARY_MOUNT_DIR. The pod template carries a digest of
    the inputs the router reads only at start (both artifacts' sha256 included), so changing one rolls the
    router."""
    r = policy.spec.router
    name = naming.router_name(policy.name)
    labels = _router_labels(policy)
    mounts: list[Obj] = [
        {"name": "policy", "mountPath": naming.POLICY_MOUNT_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[Obj] = [
        {"name": "policy", "configMap": {"name": name}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if r.classifier is not None and r.classifier.config_map is not None:
        cm = r.classifier.config_map
        mounts.append({"name": "classifier", "mountPath": naming.CLASSIFIER_MOUNT_DIR, "readOnly": True})
        items = [{"key": COPY_KEY, "path": cm.key}]
        volumes.append({"name": "classifier", "configMap": {"name": copy_name(policy), "items": items}})
    canary_ref = r.canary.classifier.config_map if r.canary is not None else None
    if canary_ref is not None:
        mounts.append({"name": "canary-classifier", "mountPath": naming.CANARY_MOUNT_DIR, "readOnly": True})
        items = [{"key": COPY_KEY, "path": canary_ref.key}]
        volumes.append({"name": "canary-classifier", "configMap": {"name": canary_copy_name(policy), "items": items}})
    mounts, volumes = [*mounts, *_tenant_keys_mount(policy)], [*volumes, *_tenant_keys_volume(policy)]
    container: Obj = {
        "name": ROUTER_CONTAINER,
        "image": r.image,
        "command": ["tiergate"],
        "args": router_args(policy),
        "env": [
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            *_api_key_env(policy),
        ],
        "ports": [
            {"name": "http", "containerPort": r.http_port, "protocol": "TCP"},
            {"name": "grpc", "containerPort": r.grpc_port, "protocol": "TCP"},
        ],
        # Standard grpc.health.v1 checks, which the kubelet speaks natively.
        "readinessProbe": {"grpc": {"port": r.grpc_port}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {
            "grpc": {"port": r.grpc_port, "service": naming.ROUTER_LIVENESS_SERVICE},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "securityContext": _container_security(uid=ROUTER_UID),
        "volumeMounts": mounts,
    }
    res = _resources(0, r.resources.cpu, r.resources.memory)
    if res:
        container["resources"] = res
    pod: Obj = {
        "serviceAccountName": name,
        "enableServiceLinks": False,
        "securityContext": _pod_security(ROUTER_UID),
        **_placement(r, 0),
        "containers": [container],
        "volumes": volumes,
    }
    return _deployment(
        policy,
        name,
        labels,
        selector_labels(policy, naming.COMPONENT_ROUTER),
        r.replicas,
        pod,
        {
            **_scrape_annotations(r.http_port),
            ROUTER_INPUTS_ANNOTATION: router_inputs_digest(policy, classifier, canary),
        },
    )


def build_router_service(policy: RoutingPolicy) -> Obj:
    r = policy.spec.router
    return _service(
        policy,
        naming.router_name(policy.name),
        _router_labels(policy),
        selector_labels(policy, naming.COMPONENT_ROUTER),
        [
            {"name": "http", "port": r.http_port, "targetPort": "http", "protocol": "TCP"},
            {"name": "grpc", "port": r.grpc_port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
        ],
    )


def build_router_pdb(policy: RoutingPolicy) -> Obj:
    return _pdb(
        policy,
        naming.router_name(policy.name),
        _router_labels(policy),
        selector_labels(policy, naming.COMPONENT_ROUTER),
    )


# --- reward model -----------------------------------------------------------------------------------------------


def _reward(policy: RoutingPolicy) -> RewardModel:
    if policy.spec.best_of_n is None:
        raise BuildError(f"RoutingPolicy {policy.name} has no bestOfN")
    return policy.spec.best_of_n.reward_model


def build_reward_deployment(policy: RoutingPolicy) -> Obj:
    """vLLM's pooling runner (`--runner pooling`: `/pooling` and `/classify` instead of generation) serving
    `rewardModel.model` under that same name, which is what the router names in its scoring calls; on
    `rewardModel.port`, which the Service and `naming.reward_url` use. The same restricted pod as a tier's
    (`_engine_pod`), placed by the reward model's own pool, selector and tolerations. `rewardModel.args` come last,
    so they can add what a particular reward model needs (`--trust-remote-code`, `--max-model-len`,
    `--pooler-config`)."""
    rm = _reward(policy)
    name = naming.reward_name(policy.name)
    labels = common_labels(policy, naming.COMPONENT_REWARD, ENGINE_APP)
    pod = _engine_pod(
        image=rm.image,
        model=rm.model,
        served_name=rm.model,
        port=rm.port,
        extra_args=["--runner", "pooling", *rm.args],
        env=[],
        resources=_resources(rm.gpus, None, None),
        placement=_placement(rm, rm.gpus),
        volume_mounts=[],
        volumes=[],
    )
    return _deployment(
        policy,
        name,
        labels,
        selector_labels(policy, naming.COMPONENT_REWARD),
        rm.replicas,
        pod,
        _scrape_annotations(rm.port),
    )


def build_reward_service(policy: RoutingPolicy) -> Obj:
    rm = _reward(policy)
    return _service(
        policy,
        naming.reward_name(policy.name),
        common_labels(policy, naming.COMPONENT_REWARD, ENGINE_APP),
        selector_labels(policy, naming.COMPONENT_REWARD),
        [{"name": "http", "port": rm.port, "targetPort": "http", "protocol": "TCP"}],
    )


def build_reward_pdb(policy: RoutingPolicy) -> Obj:
    return _pdb(
        policy,
        naming.reward_name(policy.name),
        common_labels(policy, naming.COMPONENT_REWARD, ENGINE_APP),
        selector_labels(policy, naming.COMPONENT_REWARD),
    )


# --- everything -------------------------------------------------------------------------------------------------

# Apply order: what others reference first (the ServiceAccount and its Role before the Deployment that uses them,
# the ConfigMap before the pods that mount it), so a fresh policy's pods never start without them.
KIND_ORDER = (
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "Service",
    "PodDisruptionBudget",
    "Deployment",
    # After the Deployment they scale (an autoscaler of a missing target only reports it, but there is no need).
    "HorizontalPodAutoscaler",
    "ScaledObject",
)


def build_children(
    policy: RoutingPolicy, classifier: ClassifierCopy | None = None, canary: ClassifierCopy | None = None
) -> list[Obj]:
    """Every object the policy should have, in apply order. Deterministic: same policy and artifacts, same list.
    `classifier`: the checked artifact of a classifier ConfigMap (the last good one), None when there is none;
    `canary`: the same for a canary ConfigMap (spec.router.canary.classifier.configMap)."""
    objs: list[Obj] = [
        build_router_serviceaccount(policy),
        build_router_role(policy),
        build_router_rolebinding(policy),
        build_router_configmap(policy),
    ]
    if classifier is not None:
        objs.append(build_classifier_configmap(policy, classifier))
    if canary is not None:
        objs.append(build_classifier_configmap(policy, canary, name=canary_copy_name(policy)))
    for tier in policy.spec.tiers:
        if tier.external:
            continue
        objs += [build_tier_service(policy, tier), build_tier_pdb(policy, tier), build_tier_deployment(policy, tier)]
        autoscaler = build_tier_autoscaler(policy, tier)
        if autoscaler is not None:
            objs.append(autoscaler)
    objs += [
        build_router_service(policy),
        build_router_pdb(policy),
        build_router_deployment(policy, classifier, canary),
    ]
    if policy.spec.best_of_n is not None:
        objs += [build_reward_service(policy), build_reward_pdb(policy), build_reward_deployment(policy)]
    objs.sort(key=lambda o: KIND_ORDER.index(o["kind"]))
    return objs


def child_key(obj: Obj) -> tuple[str, str]:
    """(kind, name): children are unique by it within the policy's namespace."""
    return obj["kind"], obj["metadata"]["name"]
