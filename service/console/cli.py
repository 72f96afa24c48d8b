"""The `graceful` console script: one entry point, one subcommand per job."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: graceful <command> [options]

commands:
  train     train a model version (with --old DIR --bct: backward-compatible; --pc: fewer new mistakes)
  eval      compatibility matrix of model versions (JSON + heatmap)
  adapt     fit an adapter from a new model's space into an old one's (served with no backfill)
  transform fit a map from an old model's space into a new one's (upgrades stored vectors, no images)
  interpolate  mix an old and a new model's weights (BCWI, no training): fewer new mistakes
  register-onnx  write a model version folder around an ONNX export (checked, checksummed)
  demo      the whole story on Fashion-MNIST
  serve     run the HTTP service
  backfill  start / watch / pause / resume / cancel backfill jobs of a running service
  check     measure a candidate version against a running service's gallery (as activation will)
  ingest    ingest image files (folders, files) into a running service
  search    search a running service by image (or stored item), with metadata filters
  export-sources  write a seeded sample of a running service's kept source images into a folder
  register-external  write a model version folder for embeddings computed outside graceful (no weights)

`graceful <command> --help` for a command's options; `graceful --version` for the version."""


def version() -> str:
    """The installed package's version (importlib.metadata), or a note that it is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("graceful")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        print(f"graceful {version()}")
        return 0
    cmd, rest = argv[0], argv[1:]
    from trainer.cli import (
        adapt_main,
        eval_main,
        interpolate_main,
        register_onnx_main,
        setup_logging,
        train_main,
        transform_main,
    )

    setup_logging("-v" in rest or "--verbose" in rest)
    rest = [a for a in rest if a not in ("-v", "--verbose")]
    from service.console.backfill import backfill_main
    from service.console.check import check_main
    from service.console.demo import demo_main
    from service.console.export import export_sources_main
    from service.console.items import ingest_main, search_main
    from service.console.serve import serve_main
    from trainer.external import register_external_main

    commands = {
        "train": train_main,
        "eval": eval_main,
        "adapt": adapt_main,
        "transform": transform_main,
        "interpolate": interpolate_main,
        "register-onnx": register_onnx_main,
        "serve": serve_main,
        "demo": demo_main,
        "backfill": backfill_main,
        "check": check_main,
        "ingest": ingest_main,
        "search": search_main,
        "export-sources": export_sources_main,
        "register-external": register_external_main,
    }
    if cmd not in commands:
        print(f"graceful: error: unknown command {cmd!r} (try `graceful --help`)", file=sys.stderr)
        return 2
    return commands[cmd](rest)


if __name__ == "__main__":
    sys.exit(main())
