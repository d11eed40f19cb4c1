"""`ponder bench ...`: each benchmark module adds its own subcommand (`COMMAND`, `add_arguments`,
`main`). The command line (cluster/cli.py) finds this through the `ponder.commands` entry point."""

from __future__ import annotations

import argparse
import importlib

MODULES = ("overhead", "control", "tax", "kv", "kv_path", "observe", "soak", "depth_value", "policy")


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    for name in MODULES:
        mod = importlib.import_module(f"bench.{name}")
        command, help_text = mod.COMMAND
        p = bsub.add_parser(command, help=help_text)
        mod.add_arguments(p)
        p.set_defaults(func=mod.main)
