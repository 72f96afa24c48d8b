"""The `graceful` console script: one entry point, one subcommand per job."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: graceful <command> [options]

commands:
  train     train a model version (with --old DIR --bct: backward-compatible; --pc: fewer new mistakes)
  eval      compatibility matrix of model versions (JSON + heatmap)
  adapt     fit an adapter from a new model's space into an old one's (served with no backfill)
  demo      the whole story on Fashion-MNIST
  serve     run the HTTP service
  backfill  start / watch / pause / resume / cancel backfill jobs of a running service

`graceful <command> --help` for a command's options."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    from trainer.cli import adapt_main, eval_main, setup_logging, train_main

    setup_logging("-v" in rest or "--verbose" in rest)
    rest = [a for a in rest if a not in ("-v", "--verbose")]
    from service.console.backfill import backfill_main
    from service.console.demo import demo_main
    from service.console.serve import serve_main

    commands = {"train": train_main, "eval": eval_main, "adapt": adapt_main, "serve": serve_main, "demo": demo_main,
                "backfill": backfill_main}
    if cmd not in commands:
        print(f"graceful: error: unknown command {cmd!r} (try `graceful --help`)", file=sys.stderr)
        return 2
    return commands[cmd](rest)


if __name__ == "__main__":
    sys.exit(main())
