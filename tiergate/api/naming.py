"""Names, labels and mount paths that the operator writes and the router reads: one place, shared by both.

Children of a RoutingPolicy `P` in its namespace:
  tier T (deployed):  Deployment, Service, PodDisruptionBudget  `P-tier-T`
  router:             Deployment, Service, PodDisruptionBudget, ConfigMap (the policy), ServiceAccount,
                      Role + RoleBinding (read EndpointSlices)    `P-router`
  reward model:       Deployment, Service, PodDisruptionBudget   `P-reward`
"""

from __future__ import annotations

from .policy import GROUP

POOL_LABEL = f"{GROUP}/pool"
POLICY_LABEL = f"{GROUP}/policy"
TIER_LABEL = f"{GROUP}/tier"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "tiergate-operator"

COMPONENT_TIER = "model-server"
COMPONENT_ROUTER = "router"
COMPONENT_REWARD = "reward-model"

GPU_RESOURCE = "nvidia.com/gpu"
# The taint the NVIDIA GPU operator and the managed clouds put on GPU nodes; pods asking for GPUs tolerate it.
GPU_TAINT_KEY = "nvidia.com/gpu"

# The grpc.health.v1 service name the router's liveness probe asks about: SERVING for as long as the process runs.
# The overall service ("", what the readiness probe asks) is SERVING only while some tier has an endpoint, and a
# liveness probe on it would restart a router that is merely waiting for tier pods.
ROUTER_LIVENESS_SERVICE = "liveness"

# Where the router pod finds the policy (a RoutingPolicy manifest, defaults filled in) and the classifier.
POLICY_MOUNT_DIR = "/etc/tiergate/policy"
POLICY_FILE_KEY = "policy.yaml"
POLICY_FILE = f"{POLICY_MOUNT_DIR}/{POLICY_FILE_KEY}"
CLASSIFIER_MOUNT_DIR = "/etc/tiergate/classifier"


def tier_name(policy: str, tier: str) -> str:
    """Deployment, Service and PDB name of a deployed tier."""
    return f"{policy}-tier-{tier}"


def router_name(policy: str) -> str:
    return f"{policy}-router"


def reward_name(policy: str) -> str:
    return f"{policy}-reward"


def classifier_path(key: str) -> str:
    """Path of a classifier given as a ConfigMap key, inside the router container."""
    return f"{CLASSIFIER_MOUNT_DIR}/{key}"


def tier_service_url(policy: str, namespace: str, tier: str, port: int) -> str:
    """In-cluster base URL of a deployed tier's OpenAI API."""
    return f"http://{tier_name(policy, tier)}.{namespace}.svc:{port}/v1"


def reward_url(policy: str, namespace: str, port: int) -> str:
    """In-cluster root URL of the reward model's server (the `P-reward` Service), where the router's reward client
    posts `/pooling`. No `/v1`: vLLM serves its pooling API at the root. The router derives it from the policy it
    reads (`spec.bestOfN.rewardModel.port`, the policy's namespace); the operator passes no flag for it, so a
    policy reload that changes it needs no router rollout. `tiergate serve --reward-url` replaces it."""
    return f"http://{reward_name(policy)}.{namespace}.svc:{port}"


def api_key_env(tier: str) -> str:
    """Environment variable holding an external tier's API key in the router container: the operator fills it from
    the tier's `endpoint.apiKeySecretRef` Secret, the router sends it as `Authorization: Bearer <key>`. Tier names
    are DNS labels (lower case, digits, `-`), so upper-casing and `-` -> `_` is one-to-one and a valid shell name."""
    return "TIERGATE_API_KEY_" + tier.upper().replace("-", "_")


# Tenants' API keys in the router pod: one file per tenant, named after the tenant, from a projected volume of the
# tenants' Secrets. The kubelet rewrites the files when a Secret changes, and the router re-reads them, so a rotated
# key takes effect without a restart and the router needs no permission to read Secrets.
TENANT_KEYS_DIR = "/etc/tiergate/tenant-keys"


def tenant_key_env(tenant: str) -> str:
    """Environment variable holding a tenant's API key in local mode (`tiergate serve -f POLICY.yaml`): the name
    upper-cased, `-` -> `_` (tenant names are DNS labels, so this is one-to-one)."""
    return "TIERGATE_TENANT_KEY_" + tenant.upper().replace("-", "_")


def limit_scope(namespace: str | None, policy: str) -> str:
    """The part of a tenant's limit-store keys that names its policy: replicas of one policy share counters,
    other policies on the same Redis don't."""
    return f"{namespace or 'default'}/{policy}"


def tenant_key_prefix(scope: str, tenant: str) -> str:
    """Prefix of a tenant's keys in the limit store (the routers write them, the operator reads the spend). The
    hash tag `{scope/tenant}` keeps them in one Redis Cluster slot: a Lua script may only touch keys of one slot."""
    return f"tiergate:{{{scope}/{tenant}}}"


def tenant_spend_key(scope: str, tenant: str, day: str) -> str:
    """The tenant's spend on UTC day `day` (YYYYMMDD), in nano-dollars (an integer counter)."""
    return f"{tenant_key_prefix(scope, tenant)}:spend:{day}"


# --- autoscaling ------------------------------------------------------------------------------------------------
# The metrics a tier's HPA or ScaledObject reads (spec.tiers[].autoscaling). The chart's prometheus-adapter rules
# serve these exact names, with these labels, to the Kubernetes metrics APIs; the operator's builders name them
# in the HPAs. One place, so the adapter rules, the HPAs and the router cannot drift apart.

# The router's gauge (router_service metrics.py): requests it has routed to a tier and not yet finished. Prometheus
# and the external metrics API both use this name.
ROUTER_TIER_DEMAND_METRIC = "tiergate_router_tier_demand"
# vLLM's gauge as vLLM exports it, and the name prometheus-adapter serves it under in the custom metrics API (a
# Kubernetes metric name cannot hold `:`).
VLLM_WAITING_SERIES = "vllm:num_requests_waiting"
VLLM_WAITING_METRIC = "vllm_num_requests_waiting"
# Labels of the external metric: the policy (relabelled from the router pod's tiergate.io/policy label, which
# Prometheus cannot carry as a label name) and the tier (the router's own label).
METRIC_POLICY_LABEL = "routingpolicy"
METRIC_TIER_LABEL = "tier"


def autoscaler_name(policy: str, tier: str) -> str:
    """HorizontalPodAutoscaler or ScaledObject of an autoscaled tier: named like the Deployment it scales."""
    return tier_name(policy, tier)
