"""`tiergate reward-server`: serve a reward model through vLLM's pooling API on the CPU (local mode and tests).

    tiergate reward-server [--model PATH] [--host HOST] [--port PORT]

`--model` is a local folder holding any transformers sequence-classification model with one label (its logit is
the score). Without it a stand-in scorer answers, and says so on start-up and in `/v1/models`. The server and its
API are described in tiergate_router.reward_server. Top-level imports stay light: the rest is imported in `run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tiergate_router.reward_server import RewardScorer

# vLLM's own default port: a reward server started by hand stands where `vllm serve` would.
DEFAULT_PORT = 8000


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="PATH",
        help="folder of a sequence-classification reward model (one label); default: a stand-in scorer",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}, vLLM's; 0 picks a free one)"
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="model name in the API (default: the --model path as given, as vLLM does)",
    )
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="texts per forward pass (default 16)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")


def _scorer(args: argparse.Namespace) -> RewardScorer:
    import os

    # Never reach for a model hub: a missing file must fail at once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from tiergate_router.reward_server import StandInScorer, TransformersScorer

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.model is None:
        return StandInScorer.load()
    return TransformersScorer(args.model, name=args.served_model_name, batch_size=max(1, args.batch_size))


def run(args: argparse.Namespace) -> int:
    import asyncio

    from tiergate_router.errors import RouterError
    from tiergate_router.openai_server import HTTPServer, serve_until_signalled
    from tiergate_router.reward_server import RewardServer

    try:
        scorer = _scorer(args)
    except RouterError as e:
        print(f"tiergate reward-server: {e}", file=sys.stderr)
        return 2
    if scorer.stand_in:
        print(f"tiergate reward-server: {scorer.description}", flush=True)
    server = HTTPServer(RewardServer(scorer).app(), args.host, args.port, shutdown_timeout=10)
    what = "the stand-in scorer" if scorer.stand_in else scorer.description
    print(
        f"tiergate reward-server: serving '{scorer.name}' ({what}) with vLLM's pooling API: "
        "POST /pooling, GET /v1/models, GET /health",
        flush=True,
    )
    try:
        # Prints `READY http://HOST:PORT/v1` once listening (a parent process waits for that line); the reward
        # API's root is that URL without /v1.
        asyncio.run(serve_until_signalled(server))
    except OSError as e:
        print(f"tiergate reward-server: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
