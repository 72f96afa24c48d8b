"""`graceful export-sources`: a seeded sample of a running service's kept source images, into a folder.

    graceful export-sources unlabeled/ --sample 5000 [--seed 0] [--force] [--api URL]
    graceful train --old models/v1 --bct --unlabeled unlabeled/ ...

Writes ``<item_id>.<png|jpg|webp|bin>`` files and ``manifest.json`` (each file's external id and the
version that embedded it) into DIR, made if missing; a DIR that holds anything is refused unless
``--force``. The same seed over the same gallery gives the same files. A progress bar while downloading,
then one summary line.

The API is ``--api URL`` (default ``$GRACEFUL_API_URL``, else http://127.0.0.1:8000); a key, if any, from
``GRACEFUL_API_KEY``. Exit status: 0 done; 1 the service refused or could not be reached; 2 bad arguments
(DIR not empty, --sample below 1). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from service.console import items


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graceful export-sources",
        description="Write a seeded random sample of a running service's kept source images into DIR "
        "(unlabeled images for `graceful train --unlabeled DIR`).",
    )
    p.add_argument("dir", metavar="DIR", help="folder to write into (made if missing; must be empty)")
    p.add_argument("--sample", type=int, required=True, help="items to draw (all when at least their count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--force", action="store_true", help="write into DIR even if it is not empty")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    items._common(p)
    return p


def _client(args: argparse.Namespace) -> Any:
    return items._client(args)


def export_sources_main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def run() -> int:
        from service.console.client import DestinationNotEmpty

        if args.sample < 1:
            raise items.UsageError("--sample must be at least 1")
        if args.seed < 0:
            raise items.UsageError("--seed must be a non-negative integer")
        try:
            summary = _client(args).export_sources(
                args.dir, args.sample, args.seed, force=args.force, progress=not args.no_progress
            )
        except DestinationNotEmpty as e:
            raise items.UsageError(str(e)) from None
        if args.json:
            m = summary.manifest
            print(
                json.dumps(
                    {
                        "dir": str(summary.dest),
                        "written": len(summary.written),
                        "without_source": summary.without_source,
                        "missing_from_store": summary.missing_from_store,
                        "refused": summary.refused,
                        "bytes": summary.bytes,
                        "seconds": round(summary.seconds, 3),
                        **{k: m.get(k) for k in ("seed", "sample", "items", "with_source")},
                    },
                    indent=2,
                )
            )
        else:
            print(summary.line())
        return 0

    return items._run("graceful export-sources", args, run)
