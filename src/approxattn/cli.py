"""The ``approxattn`` command: ``list`` here; other packages add their subcommands."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from rich.console import Console
from rich.table import Table

from .registry import available_methods

# packages that contribute subcommands through ``add_commands(subparsers)``
COMMAND_PROVIDERS: tuple[str, ...] = ("approxattn.lab.cli", "approxattn.bench.cli", "approxattn.distill.cli")


def list_methods(args: argparse.Namespace) -> int:
    methods = available_methods()
    if args.json:
        print(json.dumps([spec.describe() for spec in methods.values()], indent=2, default=str))
        return 0
    table = Table(title=f"approxattn: {len(methods)} attention methods", show_lines=True)
    for column in ("method", "family", "causal", "options (defaults)", "exact limit"):
        table.add_column(column, overflow="fold")
    for spec in methods.values():
        options = ", ".join(f"{o.name}={o.default!r}" for o in spec.options) or "—"
        limit = f"→ {spec.exact_limit.parent}: {spec.exact_limit.description}"
        causal = "no" if not spec.supports_causal else "yes" if spec.kv_cache_decoding else "yes (KV-cache step: hf.cached_decoding)"
        table.add_row(spec.name, spec.family, causal, options, limit)
    Console(width=args.width).print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="approxattn", description="Approximate attention: methods, comparisons, benchmarks.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list the registered attention methods")
    listing.add_argument("--json", action="store_true", help="print the registry as JSON")
    listing.add_argument("--width", type=int, default=None, help="table width in characters")
    listing.set_defaults(func=list_methods)
    for provider in COMMAND_PROVIDERS:
        importlib.import_module(provider).add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
