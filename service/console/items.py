"""`graceful ingest` and `graceful search`: put images into a running service and search it, over HTTP.

    graceful ingest photos/ [more/ a.png ...] [--metadata-json '{"source": "camera"}'] [--batch 64] [--upsert]
    graceful search query.png [--k 10] [--filter label=3 --filter color=red --filter color=blue] [--json]
    graceful search --item cats__tom [--k 10]

``ingest`` takes folders (every PNG/JPEG/WebP file under them; the external id is the path relative to the
folder without its extension, folders joined with ``__``) and files (id: the name without extension), shows
a progress bar and ends with a summary line. ``search`` prints the ranked hits (rank, external id, score,
the version that embedded the hit). ``--filter KEY=VALUE``: VALUE is read as JSON when it is a number,
true/false or a quoted string, else as text; a key given several times matches any of its values.

The API is ``--api URL`` (default ``$GRACEFUL_API_URL``, else http://127.0.0.1:8000); the key comes from
``GRACEFUL_API_KEY``. Exit status: 0 done; 1 the service refused or could not be reached (or some files were
not ingested); 2 bad arguments (a missing file, bad JSON). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_API = "http://127.0.0.1:8000"


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api",
        default=os.environ.get("GRACEFUL_API_URL", DEFAULT_API),
        help="the service's base URL (default: $GRACEFUL_API_URL, else %(default)s)",
    )
    p.add_argument(
        "--retries", type=int, default=2, help="retries of a 503 or a refused connection (default 2)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")


def _client(args: argparse.Namespace) -> Any:
    from service.console.client import GracefulClient

    return GracefulClient(
        args.api,
        os.environ.get("GRACEFUL_API_KEY") or None,
        timeout=args.timeout,
        retries=max(0, args.retries),
    )


def _run(prog: str, args: argparse.Namespace, action: Any) -> int:
    """Run ``action()``; one line on stderr and the exit status for what can go wrong."""
    import httpx

    from service.console.client import ApiError

    try:
        return int(action())
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except ApiError as e:
        print(f"{prog}: error: the service answered {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:  # refused connection, timeout, unknown host...
        print(
            f"{prog}: error: cannot reach the service at {args.api}: {e or type(e).__name__}", file=sys.stderr
        )
        return 1


# ---------------------------------------------------------------------------------------------- ingest


def _ingest_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graceful ingest",
        description="Ingest image files into a running graceful service (API key from GRACEFUL_API_KEY).",
    )
    p.add_argument(
        "paths", nargs="+", metavar="DIR|FILE", help="folders (every PNG/JPEG/WebP under them) or files"
    )
    p.add_argument(
        "--metadata-json",
        default=None,
        metavar="JSON|@FILE",
        help="a JSON object stored as every item's metadata (@FILE: read it from a file)",
    )
    p.add_argument("--batch", type=int, default=64, help="images per request (default 64)")
    p.add_argument("--upsert", action="store_true", help="replace items whose id is already stored")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _common(p)
    return p


def _metadata(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--metadata-json: cannot read {text[1:]}: {e.strerror or e}") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--metadata-json is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise UsageError(f"--metadata-json must be a JSON object, not {type(meta).__name__}")
    return meta


def ingest_main(argv: Sequence[str] | None = None) -> int:
    args = _ingest_parser().parse_args(argv)

    def run() -> int:
        from service.console.client import image_files

        meta = _metadata(args.metadata_json)
        if args.batch < 1:
            raise UsageError("--batch must be at least 1")
        try:
            files = image_files(args.paths)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        if not files:
            raise UsageError(f"no PNG, JPEG or WebP files in {', '.join(args.paths)}")
        summary = _client(args).ingest_folder(
            args.paths, metadata=meta, batch=args.batch, upsert=args.upsert, progress=not args.no_progress
        )
        if args.json:
            print(
                json.dumps(
                    {
                        "files": summary.files,
                        "stored": len(summary.stored),
                        "versions": summary.versions,
                        "seconds": round(summary.seconds, 3),
                        "failed": [{"file": f, "reason": r} for f, r in summary.failed],
                    },
                    indent=2,
                )
            )
        else:
            for f, reason in summary.failed:
                print(f"graceful ingest: {f}: {reason}", file=sys.stderr)
            print(summary.line())
        return 1 if summary.failed else 0

    return _run("graceful ingest", args, run)


# ---------------------------------------------------------------------------------------------- search


def _search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graceful search",
        description="Search a running graceful service by image "
        "(embedded by the active model) or by a stored item.",
    )
    p.add_argument("image", nargs="?", metavar="IMAGE", help="the query image (PNG, JPEG or WebP file)")
    p.add_argument("--item", default=None, metavar="EXTERNAL_ID", help="search by a stored item instead")
    p.add_argument("--k", "-k", type=int, default=10, help="hits (default 10)")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only items whose metadata KEY equals VALUE (repeat a key: any of its values)",
    )
    p.add_argument("--json", action="store_true", help="print the service's answer as JSON")
    _common(p)
    return p


def _value(text: str) -> Any:
    """A filter value: JSON when it is a number, true/false or a quoted string, else the text itself."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, str | int | float | bool) else text


def parse_filters(specs: Sequence[str]) -> dict[str, Any] | None:
    """``["label=3", "color=red", "color=blue"]`` -> ``{"label": 3, "color": {"in": ["red", "blue"]}}``."""
    values: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        if not sep or not key:
            raise UsageError(f"--filter {spec!r}: write KEY=VALUE")
        values.setdefault(key, []).append(_value(text))
    if not values:
        return None
    return {k: v[0] if len(v) == 1 else {"in": v} for k, v in values.items()}


def format_hits(answer: dict[str, Any]) -> str:
    """The ranked hits as a table, under a line naming the version that embedded the query."""
    hits = answer["hits"]
    lines = [f"{len(hits)} hits; query embedded by {answer['model_version']} (space {answer['space']})"]
    if hits:
        width = max(11, *(len(h["external_id"]) for h in hits))
        lines.append(f"{'rank':>4}  {'external_id':<{width}}  {'score':>7}  embedded_by")
        lines += [
            f"{i:>4}  {h['external_id']:<{width}}  {h['score']:>7.4f}  {h['embedded_by']}"
            for i, h in enumerate(hits, 1)
        ]
    return "\n".join(lines)


def search_main(argv: Sequence[str] | None = None) -> int:
    args = _search_parser().parse_args(argv)

    def run() -> int:
        if (args.image is None) == (args.item is None):
            raise UsageError("give a query IMAGE or --item EXTERNAL_ID (one of them)")
        if args.k < 1:
            raise UsageError("--k must be at least 1")
        flt = parse_filters(args.filter)
        client = _client(args)
        if args.image is not None:
            path = Path(args.image)
            if not path.is_file():
                raise UsageError(f"no such file: {path}")
            from service.console.client import encode_image

            try:
                raw = encode_image(path)
            except Exception as e:  # not an image PIL can read
                raise UsageError(f"{path} is not an image: {e}") from None
            answer = client.search(raw, k=args.k, filter=flt)
        else:
            answer = client.search(item_id=args.item, k=args.k, filter=flt)
        print(json.dumps(answer, indent=2) if args.json else format_hits(answer))
        return 0

    return _run("graceful search", args, run)
