"""`tiergate serve`: run the router (OpenAI-compatible HTTP, /metrics and gRPC).

    tiergate serve [-f POLICY.yaml] [--tier NAME=BASE_URL]... [--host HOST] [--port PORT]

`-f` reads a RoutingPolicy manifest (tiers with `endpoint` URLs, or tiers the operator deploys, reached through
their Services) and reloads it when it changes; each `--tier` adds an OpenAI-compatible tier (base URL ending in
/v1), cheapest first, or replaces the policy's tier of that name. With `--tier` alone the shipped default router
decides. Top-level imports stay light: everything heavy is imported inside `run`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--policy",
        dest="policy",
        type=Path,
        metavar="POLICY.yaml",
        help="RoutingPolicy manifest; reloaded without a restart when the file changes",
    )
    parser.add_argument(
        "--tier",
        action="append",
        default=[],
        metavar="NAME=BASE_URL",
        help="an OpenAI-compatible tier, cheapest first (repeatable), e.g. small=http://127.0.0.1:8001/v1",
    )
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="port of the OpenAI API and /metrics (default: the policy's httpPort, else 8080)",
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="gRPC port (default: the policy's grpcPort, else 50051; -1 disables gRPC)",
    )
    parser.add_argument(
        "--router",
        type=Path,
        default=None,
        metavar="ARTIFACT",
        help="classifier artifact (default: the policy's, else the shipped default router)",
    )
    parser.add_argument(
        "--threshold-bp",
        type=int,
        default=None,
        help="score threshold in basis points (default: the policy's, else the artifact's)",
    )
    parser.add_argument(
        "--cost-weight-bp",
        type=int,
        default=None,
        help="N-tier artifacts: the cost weight lambda in basis points (default: the artifact's calibrated one)",
    )
    parser.add_argument(
        "--encoder",
        choices=("auto", "torch", "onnx", "onnx-int8"),
        default="auto",
        help="prompt encoder runtime (auto: ONNX Runtime int8 when installed, else torch)",
    )
    parser.add_argument(
        "--discovery",
        choices=("auto", "on", "off"),
        default="auto",
        help="find tier pods through EndpointSlices (auto: on inside a Kubernetes pod)",
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def run(args: argparse.Namespace) -> int:
    import logging

    from tiergate_router.errors import RouterError

    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return _run_loop(_serve(args))
    except RouterError as e:
        print(f"tiergate serve: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tiergate serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _run_loop(main: Any) -> int:
    """Run on uvloop when it is installed (the router extra pins it): the proxy path is event-loop bound, and
    uvloop's C loop roughly halves the router's CPU time per request compared with the pure-Python loop."""
    import asyncio

    try:
        import uvloop
    except ModuleNotFoundError:
        result: int = asyncio.run(main)
        return result
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        out: int = runner.run(main)
        return out


def build_config(args: argparse.Namespace, policy: Any, thresholds: Any) -> Any:
    """The RouterConfig from the command line and the (optional) policy. Pure apart from reading nothing.
    `thresholds` is the loaded classifier (None with one tier); an N-tier one makes the config choose by cost
    weight (config.with_multi_tier), and the two-tier knobs are refused for it."""
    from tiergate_router.config import from_policy, local_config, with_multi_tier
    from tiergate_router.errors import ConfigError

    flags = tier_flags(args)
    multi = thresholds if getattr(thresholds, "kind", None) == "multi_tier" else None
    if multi is None and args.cost_weight_bp is not None:
        raise ConfigError("--cost-weight-bp: applies to N-tier (multi_tier) artifacts only")
    if multi is not None and args.threshold_bp is not None:
        raise ConfigError("--threshold-bp: an N-tier artifact chooses by cost weight; use --cost-weight-bp")
    # The cost weight: --cost-weight-bp, else the policy's knob (costWeightBasisPoints, budgetPerMillion), else the
    # artifact's calibrated default.
    cost_weight = args.cost_weight_bp
    if policy is not None:
        cfg = from_policy(policy, discovery=_discovery(args), thresholds=thresholds, multi=multi)
        if cost_weight is None and cfg.multi_tier is not None:
            cost_weight = cfg.multi_tier.cost_weight_bp
        if flags:
            cfg = local_config(flags, base=cfg)
    else:
        if not flags:
            raise ConfigError("nothing to route to: give -f POLICY.yaml or at least one --tier NAME=BASE_URL")
        default_bp = thresholds.default_threshold_bp if thresholds is not None and multi is None else 5000
        cfg = local_config(flags, threshold_bp=default_bp)
    if args.threshold_bp is not None:
        cfg = cfg.replace(thresholds_bp=(args.threshold_bp,) * (len(cfg.tiers) - 1))
    if multi is not None:
        cfg = with_multi_tier(cfg, multi, cost_weight)
    return cfg


def _knob(cfg: Any) -> str:
    if cfg.multi_tier is not None:
        return f"N-tier artifact, cost weight {cfg.multi_tier.cost_weight_bp} bp"
    return f"threshold {', '.join(map(str, cfg.thresholds_bp)) or '-'} bp"


def tier_flags(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The `--tier NAME=BASE_URL` flags, checked (ConfigError names the bad one)."""
    from tiergate_router.config import parse_tier_flag
    from tiergate_router.errors import ConfigError

    flags = [parse_tier_flag(v) for v in args.tier]
    names = [n for n, _ in flags]
    if len(set(names)) != len(names):
        raise ConfigError(f"--tier: a tier name is given twice ({', '.join(names)})")
    return flags


def _warn_unserved(policy: Any) -> None:
    import logging

    from tiergate_router.config import unserved_sections

    if policy is not None:
        for section in unserved_sections(policy):
            logging.getLogger("tiergate_router").warning(
                "policy %s: %s is not implemented by this router version and is ignored", policy.metadata.name, section
            )


def _discovery(args: argparse.Namespace) -> bool:
    if args.discovery == "auto":
        return "KUBERNETES_SERVICE_HOST" in os.environ
    return bool(args.discovery == "on")


async def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from tiergate_router.artifact_classifier import load_classifier
    from tiergate_router.classifier import MicroBatcher
    from tiergate_router.config import policy_classifier_path, read_policy
    from tiergate_router.errors import ConfigError
    from tiergate_router.restart_inputs import refuse_restart_changes, report_classifier
    from tiergate_router.server import RouterServer, ServeOptions

    # Check the cheap things (flags, policy) before loading the encoder, which takes seconds.
    tier_flags(args)
    policy = read_policy(args.policy) if args.policy is not None else None
    _warn_unserved(policy)
    if policy is None and not args.tier:
        raise ConfigError("nothing to route to: give -f POLICY.yaml or at least one --tier NAME=BASE_URL")
    n_tiers = (
        len({*(t.name for t in policy.spec.tiers), *(v.partition("=")[0] for v in args.tier)})
        if policy is not None
        else len(args.tier)
    )
    loaded = None
    if n_tiers > 1:
        artifact = args.router or (policy_classifier_path(policy) if policy is not None else None)
        loaded = load_classifier(artifact, encoder=args.encoder)
        classifier = loaded.classifier
    else:
        # One tier: nothing to decide, so no encoder is loaded (and torch never imported).
        classifier = MicroBatcher(lambda prompts: [0.0] * len(prompts))
    cfg = build_config(args, policy, loaded)

    def reload(path: Path) -> Any:
        new = read_policy(path)
        if policy is not None:  # always, as reload is only set up with -f
            refuse_restart_changes(policy, new)
        cfg = build_config(args, new, loaded)
        _warn_unserved(new)
        return cfg

    router_spec = policy.spec.router if policy is not None else None
    port = args.port if args.port is not None else (router_spec.http_port if router_spec is not None else 8080)
    grpc_port = (
        args.grpc_port if args.grpc_port is not None else (router_spec.grpc_port if router_spec is not None else 50051)
    )
    options = ServeOptions(
        host=args.host or "127.0.0.1",
        port=port,
        grpc_port=None if grpc_port < 0 else grpc_port,
        policy_file=args.policy,
        policy_loader=reload if args.policy is not None else None,
        discovery=any(t.service is not None for t in cfg.tiers),
    )
    server = RouterServer(cfg, classifier, options)
    report_classifier(server.router.metrics, loaded.source if loaded else None, loaded.kind if loaded else "none")
    await server.start()
    host = options.host
    print(
        f"tiergate router: OpenAI API on http://{host}:{server.http_port}/v1 (model 'tiergate' routes; tiers: "
        f"{', '.join(cfg.tier_names)}; {_knob(cfg)}), metrics on "
        f"http://{host}:{server.http_port}/metrics"
        + (f", gRPC on {host}:{server.grpc_port}" if options.grpc_port is not None else ""),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("tiergate router: shutting down (finishing requests in flight)", flush=True)
    await server.stop()
    return 0
