"""Autoscaling benchmark: time from the start of load on a tier to the new pods serving, on the real HPA.

    sudo python bench/hpa_scaleup.py [--runs 3] [--concurrency 8] [--target 2] [--latency 1.5]

Starts its own control plane (tiergate.devcluster, root needed for the pod network), Prometheus and
prometheus-adapter with the chart's scrape configs and rules (tiergate.devcluster.metrics), and plays a policy's
pods: the router at its pod IP, a fake vLLM per tier pod (tests/support/metrics_pipeline.py). Each run sends
`--concurrency` requests at a time to one tier pod through the router, each held `--latency` seconds, with an HPA
(External metric tiergate_router_tier_demand, AverageValue `--target`) on the tier; it scales to
concurrency / target replicas. Printed per run, as JSON lines: seconds from load start until the HPA raised the
replicas, until the first new pod answered, until every new pod answered; and from load stop until back to one
replica. The pipeline's own delays: Prometheus scrapes every second, the HPA controller syncs every 3 s
(tiergate.devcluster.cluster.HPA_SYNC_PERIOD_S; Kubernetes' default is 15 s), scale-down waits 5 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

# Run by path, this script has only bench/ on sys.path; the checkout's root makes `tests.support` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--target", type=int, default=2, help="the HPA's AverageValue target of demand per pod")
    p.add_argument("--latency", type=float, default=1.5, help="seconds each fake tier pod holds a request")
    args = p.parse_args()
    if args.concurrency % args.target:
        p.error("--concurrency must be a multiple of --target (the scale-up goes to exactly concurrency/target)")

    from kubernetes import config

    from tests.support import metrics_pipeline as mp
    from tiergate.devcluster import build, scaling
    from tiergate.devcluster.cluster import DevCluster, wait_for
    from tiergate.devcluster.metrics import MetricsStack

    bins = build.ensure_all()
    with tempfile.TemporaryDirectory(prefix="tiergate-hpa-bench-") as tmp:
        say = lambda m: print(f"[devcluster] {m}", file=sys.stderr)  # noqa: E731
        with DevCluster(bins, Path(tmp), say=say) as dc:
            api = config.new_client_from_config(config_file=str(dc.kubeconfig))
            with MetricsStack(
                dc,
                adapter=bins["prometheus-adapter"],
                scrape_configs=mp.scrape_configs(),
                adapter_rules=mp.adapter_rules_text(),
            ):
                for run in range(args.runs):
                    ns = f"hpa-bench-{run}"
                    dc.kubectl("create", "namespace", ns)
                    wait_for(
                        "the default ServiceAccount",
                        lambda ns=ns: dc.kubectl("get", "sa", "default", "-n", ns, check=False),
                    )
                    maximum = args.concurrency // args.target
                    with mp.PolicyBed(dc, ns, "bench", {"small": 1}, api, latency_s=args.latency) as bed:
                        wait_for("the tier pod served", lambda: len(bed.sync()) == 1)
                        wait_for("the router discovering it", lambda: bed.endpoints("small"))
                        hpa = mp.hpa_object(
                            "bench", "small", average_demand=args.target, min_replicas=1, max_replicas=maximum
                        )
                        dc.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(hpa))
                        result = scaling.run_scale_scenario(
                            bed, "small", concurrency=args.concurrency, min_replicas=1, max_replicas=maximum
                        )
                    print(
                        json.dumps({"run": run, "replicas": f"1->{maximum}", **dataclasses.asdict(result)}), flush=True
                    )
                    dc.kubectl("delete", "namespace", ns, "--wait=false")
            api.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
