"""The fake node pools kwok plays the kubelet for.

The pools mirror what a platform team runs: a CPU pool for the router and the operator, two GPU pools of
different size for the model tiers, and a dedicated pool for the reward model. GPU pools are tainted the way
the NVIDIA GPU operator and the managed clouds taint them, so only pods that tolerate the taint and ask for
`nvidia.com/gpu` land there; the real scheduler decides by resources, selectors and tolerations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

POOL_LABEL = "tiergate.io/pool"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
# Only nodes with this annotation (and the value of their cluster's kwok) are driven by our kwok: it must never
# touch a real cluster's nodes, nor the fake nodes another kwok drives on the same cluster.
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
DEFAULT_OWNER = "fake"
DEFAULT_PREFIX = "kwok-"


@dataclass(frozen=True)
class Pool:
    name: str
    count: int
    cpu: str
    memory: str
    gpus: int = 0
    gpu_product: str = ""


POOLS: tuple[Pool, ...] = (
    Pool("cpu", count=2, cpu="16", memory="64Gi"),
    Pool("gpu-small", count=2, cpu="32", memory="128Gi", gpus=4, gpu_product="NVIDIA-L4"),
    Pool("gpu-large", count=2, cpu="96", memory="1024Gi", gpus=8, gpu_product="NVIDIA-H100-80GB-HBM3"),
    Pool("reward", count=1, cpu="16", memory="64Gi", gpus=1, gpu_product="NVIDIA-L4"),
)


def node_name(pool: Pool, i: int, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}{pool.name}-{i}"


def node_manifest(pool: Pool, i: int, prefix: str = DEFAULT_PREFIX, owner: str = DEFAULT_OWNER) -> dict[str, object]:
    name = node_name(pool, i, prefix)
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/role": "agent",
        "type": "kwok",
        POOL_LABEL: pool.name,
    }
    capacity = {"cpu": pool.cpu, "memory": pool.memory, "pods": "110"}
    taints: list[dict[str, str]] = []
    if pool.gpus:
        labels["nvidia.com/gpu.present"] = "true"
        labels["nvidia.com/gpu.product"] = pool.gpu_product
        labels["nvidia.com/gpu.count"] = str(pool.gpus)
        capacity[GPU_RESOURCE] = str(pool.gpus)
        taints.append(dict(GPU_TAINT))
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {KWOK_ANNOTATION: owner, "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": taints},
        # kwok's node-initialize stage fills in conditions, addresses and nodeInfo; capacity is ours to set.
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def all_nodes_json(prefix: str = DEFAULT_PREFIX, owner: str = DEFAULT_OWNER) -> str:
    """Every node as one List document, for a single `kubectl apply -f -`."""
    items = [node_manifest(p, i, prefix, owner) for p in POOLS for i in range(p.count)]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def node_names(prefix: str = DEFAULT_PREFIX) -> list[str]:
    return [node_name(p, i, prefix) for p in POOLS for i in range(p.count)]
