"""`tiergate serve`: run the router (OpenAI-compatible HTTP, /metrics and gRPC).

    tiergate serve [-f POLICY.yaml] [--tier NAME=BASE_URL]... [--host HOST] [--port PORT]
                   [--tier-modalities NAME=text,image]...
                   [--best-of-n TIER=N --reward-url URL] [--decision-log FILE [--decision-log-prompts]]
                   [--personalization [--personalization-max-users N] [--personalization-prior K]]

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from tiergate_router.config import LocalOverrides, RouterConfig


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
    parser.add_argument(
        "--tier-modalities",
        action="append",
        default=[],
        metavar="NAME=text,image",
        help="input modalities a tier accepts (text, image, audio; always text), e.g. vision=text,image; "
        "replaces spec.tiers[].modalities (default text)",
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
    bon = parser.add_argument_group(
        "best-of-N", "sample several answers on one tier, return the one a reward model scores highest (spec.bestOfN)"
    )
    bon.add_argument(
        "--best-of-n",
        default=None,
        metavar="TIER=N",
        help="what the router sends to TIER gets up to N samples (1..16), reranked by the reward model",
    )
    bon.add_argument(
        "--reward-url",
        default=None,
        metavar="URL",
        help="root URL of the reward server (vLLM's pooling API or `tiergate reward-server`), e.g. "
        "http://127.0.0.1:8090 (default with a policy: the reward Service the operator deploys)",
    )
    bon.add_argument("--reward-model", default=None, metavar="NAME", help="reward model name (default: ask the server)")
    bon.add_argument("--reward-timeout-ms", type=int, default=None, metavar="MS", help="reward deadline (default 3000)")
    bon.add_argument(
        "--min-reward", default=None, metavar="R", help="best score below R: the reference tier answers instead"
    )
    bon.add_argument(
        "--reference-tier", default=None, metavar="TIER", help="answers when best-of-N cannot (default: strongest)"
    )
    shadow = parser.add_argument_group(
        "shadow routing and canary", "compare the router with a baseline tier, or try a second artifact (spec.shadow)"
    )
    shadow.add_argument(
        "--shadow",
        default=None,
        metavar="MODE=TIER",
        help="Baseline=TIER: TIER answers everything, the router's decision is only recorded; Mirror=TIER: a sample "
        "of requests is also sent to TIER in the background and both answers judged",
    )
    shadow.add_argument(
        "--shadow-sample-bp", type=int, default=None, metavar="N", help="share of routed requests judged (0..10000)"
    )
    shadow.add_argument(
        "--shadow-max-concurrent", type=int, default=None, metavar="N", help="background shadow calls at once (16)"
    )
    shadow.add_argument(
        "--shadow-reward-url", default=None, metavar="URL", help="reward server judging (default: --reward-url's)"
    )
    shadow.add_argument(
        "--canary-artifact", type=Path, default=None, metavar="PATH", help="a second classifier artifact"
    )
    shadow.add_argument(
        "--canary-share-bp",
        type=int,
        default=None,
        metavar="N",
        help="share of routed requests the canary artifact decides (0..10000), by request id",
    )
    from tiergate_router.config.local import DISPATCH_FLAGS

    limits = parser.add_argument_group(
        "dispatch limits", "integers; each replaces the policy's spec.router.<field> (named below) or its default"
    )
    for f in DISPATCH_FLAGS:
        limits.add_argument(f.flag, type=int, default=None, metavar="N", help=f"spec.router.{f.policy_field}")
    parser.add_argument(
        "--classifier-cache-entries",
        type=int,
        default=None,
        metavar="N",
        help="verdicts the classifier cache keeps at most, 0 = no cache (default: the policy's, else 16384)",
    )
    parser.add_argument(
        "--classifier-cache-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="memory the classifier cache may hold, 0 = no cache (default: the policy's, else 4194304)",
    )
    parser.add_argument(
        "--max-inflight-body-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="request bodies (HTTP and gRPC) held at once; more requests wait their turn (default: the policy's "
        "spec.router.bodyLimits.maxInFlightRequestBytes, else 67108864; at least 4 MiB)",
    )
    parser.add_argument(
        "--max-response-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest non-streaming answer read from a tier, else HTTP 502 (default: the policy's "
        "spec.router.bodyLimits.maxResponseBytes, else 16777216)",
    )
    parser.add_argument(
        "--decision-log",
        default=None,
        metavar="FILE",
        help="write one JSON record per request to FILE (rotated at 100 MiB, 5 kept), '-' for stdout; feedback "
        "records join on request_id (default: the policy's spec.router.decisionLog, else none)",
    )
    parser.add_argument(
        "--decision-log-prompts",
        action="store_true",
        help="also write prompts' text to the decision log (default: only their sha256, unless the policy's "
        "decisionLog.includePrompts)",
    )
    prof = parser.add_argument_group(
        "per-user profiles",
        "N-tier artifacts: adjust each decision by the requesting user's (OpenAI `user` field) own feedback "
        "(spec.router.personalization)",
    )
    prof.add_argument(
        "--personalization",
        action="store_true",
        help="turn per-user routing profiles on (default: as the policy says, else off)",
    )
    prof.add_argument(
        "--personalization-max-users",
        type=int,
        default=None,
        metavar="N",
        help="users the profile table holds, 16..1000000 (default: the policy's maxUsers, else 100000)",
    )
    prof.add_argument(
        "--personalization-prior",
        type=int,
        default=None,
        metavar="K",
        help="ratings before a user's own outcomes weigh as much as the artifact's prediction, 1..10000 "
        "(default: the policy's priorStrength, else 50)",
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
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="third-party libraries' logs (ONNX Runtime, aiohttp, kubernetes) at --log-level too (default: WARNING)",
    )


def run(args: argparse.Namespace) -> int:
    import logging

    from tiergate_router.errors import RouterError

    level = getattr(logging, args.log_level)
    # Third-party libraries log through the root logger (the ONNX quantiser alone writes ~60 INFO lines on the first
    # start), which would bury the router's own lines: they stay at WARNING unless -v; ours follow --log-level.
    logging.basicConfig(
        level=level if args.verbose else max(level, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for ours in ("tiergate", "tiergate_router"):
        logging.getLogger(ours).setLevel(level)
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


def _run_loop(main: Coroutine[object, object, int]) -> int:
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


def overrides(args: argparse.Namespace) -> LocalOverrides:
    """The flags that change the configuration or the listeners, typed (`--tier` checked: ConfigError names the bad
    one)."""
    from tiergate_router.config import DISPATCH_FLAGS, LocalOverrides, dispatch_settings, parse_tier_flags
    from tiergate_router.config.local import (
        BestOfNFlags,
        parse_best_of_n_flag,
        parse_min_reward,
        parse_reward_url,
        parse_tier_modalities_flags,
    )
    from tiergate_router.config.personalization import PersonalizationFlags
    from tiergate_router.config.shadow import ShadowFlags, basis_points, parse_shadow_flag
    from tiergate_router.errors import ConfigError

    best_of_n = BestOfNFlags(
        tier_n=None if args.best_of_n is None else parse_best_of_n_flag(args.best_of_n),
        reward_url=None if args.reward_url is None else parse_reward_url(args.reward_url),
        reward_model=args.reward_model,
        timeout_ms=args.reward_timeout_ms,
        min_reward=None if args.min_reward is None else parse_min_reward(args.min_reward),
        reference_tier=args.reference_tier,
    )
    shadow = ShadowFlags(
        mode_tier=None if args.shadow is None else parse_shadow_flag(args.shadow),
        sample_bp=basis_points("--shadow-sample-bp", args.shadow_sample_bp),
        max_concurrent=args.shadow_max_concurrent,
        reward_url=None if args.shadow_reward_url is None else parse_reward_url(args.shadow_reward_url),
        canary_artifact=args.canary_artifact,
        canary_share_bp=basis_points("--canary-share-bp", args.canary_share_bp),
    )
    if (shadow.canary_artifact is None) != (shadow.canary_share_bp is None) and args.policy is None:
        raise ConfigError("--canary-artifact and --canary-share-bp: give both (or a policy with spec.router.canary)")
    return LocalOverrides(
        shadow=shadow,
        best_of_n=best_of_n,
        tiers=parse_tier_flags(args.tier),
        tier_modalities=parse_tier_modalities_flags(args.tier_modalities),
        dispatch=dispatch_settings({f.dest: getattr(args, f.dest) for f in DISPATCH_FLAGS}),
        threshold_bp=args.threshold_bp,
        cost_weight_bp=args.cost_weight_bp,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        cache_entries=args.classifier_cache_entries,
        cache_bytes=args.classifier_cache_bytes,
        inflight_body_bytes=args.max_inflight_body_bytes,
        response_bytes=args.max_response_bytes,
        decision_log=args.decision_log,
        decision_log_prompts=args.decision_log_prompts,
        personalization=PersonalizationFlags(
            enabled=args.personalization,
            max_users=args.personalization_max_users,
            prior_strength=args.personalization_prior,
        ),
    )


def _knob(cfg: RouterConfig) -> str:
    if cfg.multi_tier is not None:
        knob = f"N-tier artifact, cost weight {cfg.multi_tier.cost_weight_bp} bp"
    else:
        knob = f"threshold {', '.join(map(str, cfg.thresholds_bp)) or '-'} bp"
    if cfg.canary is not None:
        knob += f"; canary {cfg.canary.artifact} deciding {cfg.canary.share_bp} bp"
    if cfg.shadow is not None:
        knob += f"; shadow {cfg.shadow.mode} against {cfg.shadow.baseline_tier}, {cfg.shadow.sample_rate_bp} bp judged"
    b = cfg.best_of_n
    if b is not None:
        knob += f"; best-of-{b.max_samples} on {b.tier}, reward model at {b.reward_url}, reference {b.reference_tier}"
    if cfg.personalization is not None:
        knob += f"; per-user profiles for up to {cfg.personalization.max_users} users"
    return knob


def _discovery(args: argparse.Namespace) -> bool:
    if args.discovery == "auto":
        return "KUBERNETES_SERVICE_HOST" in os.environ
    return bool(args.discovery == "on")


async def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from tiergate_router.artifact_classifier import LoadedClassifier, load_classifier
    from tiergate_router.classifier import MicroBatcher
    from tiergate_router.config import listen, policy_classifier_path, read_policy, serve_config, served_tier_names
    from tiergate_router.config.serve import NOTHING_TO_ROUTE
    from tiergate_router.config.shadow import policy_canary_path
    from tiergate_router.errors import ConfigError
    from tiergate_router.restart_inputs import refuse_restart_changes, report_classifier
    from tiergate_router.server import RouterServer, ServeOptions

    # Check the cheap things (flags, policy) before loading the encoder, which takes seconds.
    local = overrides(args)
    policy = read_policy(args.policy) if args.policy is not None else None
    if policy is None and not local.tiers:
        raise ConfigError(NOTHING_TO_ROUTE)
    loaded: LoadedClassifier | None = None
    canary: LoadedClassifier | None = None
    if len(served_tier_names(policy, local.tiers)) > 1:
        artifact = args.router or (policy_classifier_path(policy) if policy is not None else None)
        loaded = load_classifier(artifact, encoder=args.encoder)
        classifier = loaded.classifier
        canary_path = local.shadow.canary_artifact or policy_canary_path(policy)
        if canary_path is not None:
            canary = load_classifier(canary_path, encoder=args.encoder)
    else:
        # One tier: nothing to decide, so no encoder is loaded (and torch never imported).
        classifier = MicroBatcher(lambda prompts: [0.0] * len(prompts))
    discovery = _discovery(args)
    cfg = serve_config(policy, local, loaded, discovery=discovery, canary=canary)

    def reload(path: Path) -> RouterConfig:
        new = read_policy(path)
        if policy is not None:  # always, as reload is only set up with -f
            refuse_restart_changes(policy, new)
        cfg = serve_config(new, local, loaded, discovery=discovery, canary=canary)
        return cfg

    where = listen(policy, local)
    options = ServeOptions(
        host=where.host,
        port=where.port,
        grpc_port=where.grpc_port,
        policy_file=args.policy,
        policy_loader=reload if args.policy is not None else None,
        discovery=any(t.service is not None for t in cfg.tiers),
    )
    server = RouterServer(cfg, classifier, options, canary_classifier=canary.classifier if canary else None)
    server.router.artifact_id = report_classifier(
        server.router.metrics, loaded.source if loaded else None, loaded.kind if loaded else "none"
    )
    if canary is not None:
        server.router.canary_artifact_id = report_classifier(server.router.metrics, canary.source, canary.kind)
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
