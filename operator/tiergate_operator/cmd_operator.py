"""`tiergate operator [--namespace NS]`: run the RoutingPolicy operator against the current cluster.

Credentials: --kubeconfig, else in-cluster (in a pod), else KUBECONFIG / ~/.kube/config. All namespaces unless
--namespace is given. Top-level imports stay light; kopf and kubernetes are imported in `run`.
"""

from __future__ import annotations

import argparse
import logging


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", "-n", default=None, help="watch only this namespace (default: all namespaces)")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, else KUBECONFIG)")
    parser.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="hold a Lease before reconciling, for running several replicas (default: on inside a pod)",
    )
    parser.add_argument("--lease-namespace", default=None, help="namespace of the Lease (default: the pod's own)")
    parser.add_argument("--health-port", type=int, default=None, help="serve GET /healthz on this port")
    parser.add_argument("--resync-seconds", type=float, default=None, help="re-apply every policy this often (60)")
    parser.add_argument("--workers", type=int, default=None, help="concurrent reconciles (16)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from .config import OperatorConfig
    from .errors import OperatorError

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kopf logs every watch event at INFO; ours say what happened.
    logging.getLogger("kopf").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    try:
        cfg = OperatorConfig.from_env(
            namespace=args.namespace,
            kubeconfig=args.kubeconfig,
            leader_elect=args.leader_elect if args.leader_elect is not None else (in_pod or None),
            lease_namespace=args.lease_namespace,
            health_port=args.health_port,
            resync_seconds=args.resync_seconds,
            workers=args.workers,
        )
    except OperatorError as e:
        logging.error("%s", e)
        return 2
    from .main import serve

    try:
        return asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        return 130
    except OperatorError as e:
        logging.error("%s", e)
        return 1
