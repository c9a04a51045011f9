"""The `tiergate` command: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing `configure(parser)` and `run(args) -> int`. Modules are
named here as strings and imported only when needed, so `tiergate operator` never imports torch and
`tiergate --help` stays fast. Subcommand modules must keep their top-level imports light for the same reason
(heavy libraries are imported inside `run`). This dispatcher is the only place that names both the operator
and the router packages; they never import each other.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("tiergate_router.cmd_serve", "run the router (OpenAI HTTP + gRPC) locally or in a pod"),
    "reward-server": ("tiergate_router.cmd_reward_server", "serve a reward model through vLLM's pooling API (CPU)"),
    "operator": ("tiergate_operator.cmd_operator", "run the Kubernetes operator against the current cluster"),
    "train": ("tiergate.training.cmd_train", "train a router artifact from per-prompt outcome data"),
    "eval": ("tiergate.training.cmd_eval", "cost-quality evaluation of a router on outcome data"),
    "calibrate": ("tiergate.training.cmd_calibrate", "pick a router threshold for a cost or quality target"),
    "dev-cluster": ("tiergate.devcluster.cmd", "build, start and stop the local development control plane"),
}


class _Command(Protocol):
    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _load(name: str) -> _Command | None:
    module, _ = SUBCOMMANDS[name]
    try:
        return cast(_Command, importlib.import_module(module))
    except ModuleNotFoundError as e:
        # A light install (no extra for this part) lacks the subcommand's dependencies: say which extra.
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            return None
        raise


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiergate", description="Route each prompt to the cheapest LLM tier that answers it well."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen subcommand's module is imported; the others are listed by name and help text.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            cmd = _load(name)
            if cmd is None:
                p.set_defaults(_missing=name)
            else:
                cmd.configure(p)
                p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    missing = getattr(args, "_missing", None)
    if missing:
        print(
            f"tiergate {missing}: this install lacks its dependencies; install tiergate with the matching extra "
            f"(e.g. pip install 'tiergate[router,train]')",
            file=sys.stderr,
        )
        return 2
    run = args._run
    code: int = run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
