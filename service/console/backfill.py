"""`graceful backfill`: start, watch and steer backfill jobs of a running service over its HTTP API.

    graceful backfill start v2 [--policy uncertainty] [--rate-limit 500] [--batch-size 256] [--stop-at 0.5] [--wait]
                            [--engine ray [--address ADDR] [--workers N]]
    graceful backfill start v2 --kind transform [--source v1] [--wait]   # map the stored vectors, no images
    graceful backfill status [JOB] [--wait]      # no JOB: every job
    graceful backfill pause|cancel JOB
    graceful backfill resume JOB [--stop-at F] [--rate-limit R] [--wait]

The API is ``--api URL`` (default ``$GRACEFUL_API_URL``, else http://127.0.0.1:8000); the key comes from
``GRACEFUL_API_KEY``. ``--wait`` shows a progress bar until the job stops running, and exits 0 when it is
done or paused at its stop point, 1 when it failed or was cancelled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_API = "http://127.0.0.1:8000"
RUNNING = ("pending", "running")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api",
        default=os.environ.get("GRACEFUL_API_URL", DEFAULT_API),
        help="the service's base URL (default: $GRACEFUL_API_URL, else %(default)s)",
    )
    common.add_argument("--json", action="store_true", help="print the job(s) as JSON")
    p = argparse.ArgumentParser(
        prog="graceful backfill",
        description="Backfill jobs of a running graceful service (API key from GRACEFUL_API_KEY).",
    )
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("start", parents=[common], help="re-embed the gallery with a candidate version")
    s.add_argument("candidate")
    s.add_argument(
        "--kind",
        choices=["image", "transform"],
        default=None,
        help="image: re-embed the kept sources (the default); transform: map the stored vectors of --source "
        "through the transform fitted by `graceful transform` (no image is read)",
    )
    s.add_argument(
        "--source",
        default=None,
        help="--kind transform: whose stored vectors to map (unset: the active version)",
    )
    s.add_argument("--policy", choices=["sequential", "uncertainty"], default=None)
    s.add_argument("--rate-limit", type=float, default=None, help="items/s cap")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--stop-at", type=float, default=None, help="pause once this share of the gallery is done")
    s.add_argument(
        "--engine",
        choices=["local", "ray"],
        default=None,
        help="where items are embedded: the server's thread (local, the default) or a Ray cluster",
    )
    s.add_argument("--address", default=None, help="the Ray cluster (--engine ray; unset: a local one)")
    s.add_argument("--workers", type=int, default=None, help="Ray actors (--engine ray; unset: the server's)")
    s.add_argument("--wait", action="store_true", help="show progress until the job stops running")
    s = sub.add_parser("status", parents=[common], help="a job's progress (every job without JOB)")
    s.add_argument("job", nargs="?", type=int)
    s.add_argument("--wait", action="store_true")
    for name in ("pause", "cancel"):
        sub.add_parser(name, parents=[common], help=f"{name} a job").add_argument("job", type=int)
    s = sub.add_parser("resume", parents=[common], help="resume a paused job")
    s.add_argument("job", type=int)
    s.add_argument("--stop-at", type=float, default=None)
    s.add_argument("--rate-limit", type=float, default=None)
    s.add_argument("--wait", action="store_true")
    return p


def describe(job: dict[str, Any]) -> str:
    """One line: ``job 3 v2 (uncertainty): running 1200/8000 (15.0%), 950 items/s, ETA 7s, 2 skipped``."""
    engine = f", ray x{job.get('workers')}" if job.get("engine") == "ray" else ""
    how = f"transform from {job.get('source')}" if job.get("kind") == "transform" else job["policy"]
    line = (
        f"job {job['id']} {job['candidate']} ({how}{engine}): {job['status']} "
        f"{job['done']}/{job['total']} ({100 * job['fraction']:.1f}%)"
    )
    if job.get("rate"):
        line += f", {job['rate']:.0f} items/s"
    if job.get("eta_seconds") is not None and job["status"] == "running":
        line += f", ETA {job['eta_seconds']:.0f}s"
    if job.get("skipped"):
        what = "no stored vector to map" if job.get("kind") == "transform" else "no usable source"
        line += f", {job['skipped']} skipped ({what})"
    if job.get("error"):
        line += f", error: {job['error']}"
    if job.get("can_activate") is not None and job["status"] == "done":
        line += ", can activate" if job["can_activate"] else ", cannot activate yet"
    return line


def _wait(client: Any, job: dict[str, Any], poll: float = 0.5) -> dict[str, Any]:
    from tqdm import tqdm

    with tqdm(
        total=job["total"],
        initial=job["done"],
        desc=f"backfill {job['candidate']}",
        unit="item",
        dynamic_ncols=True,
    ) as bar:
        while job["status"] in RUNNING:
            time.sleep(poll)
            job = client.get(f"/v1/backfill/{job['id']}")
            bar.total = job["total"]
            bar.update(job["done"] + job["skipped"] - bar.n)
            bar.set_postfix_str(
                job["status"] + (f" {job['rate']:.0f}/s" if job.get("rate") else ""), refresh=False
            )
    return job


def backfill_main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import httpx

    from service.console.client import ApiError, GracefulClient

    client = GracefulClient(args.api, os.environ.get("GRACEFUL_API_KEY") or None)
    try:
        if args.action == "status" and args.job is None:
            jobs = client.get("/v1/backfill")["jobs"]
            print(
                json.dumps(jobs, indent=2)
                if args.json
                else "\n".join(map(describe, jobs)) or "no backfill jobs"
            )
            return 0
        if args.action == "start":
            body = {
                "candidate": args.candidate,
                "kind": args.kind,
                "source": args.source,
                "policy": args.policy,
                "rate_limit": args.rate_limit,
                "batch_size": args.batch_size,
                "stop_at": args.stop_at,
                "engine": args.engine,
                "address": args.address,
                "workers": args.workers,
            }
            job = client.post("/v1/backfill", json={k: v for k, v in body.items() if v is not None})
        elif args.action == "status":
            job = client.get(f"/v1/backfill/{args.job}")
        elif args.action == "resume":
            body = {"stop_at": args.stop_at, "rate_limit": args.rate_limit}
            job = client.post(
                f"/v1/backfill/{args.job}/resume", json={k: v for k, v in body.items() if v is not None}
            )
        else:
            job = client.post(f"/v1/backfill/{args.job}/{args.action}")
        if getattr(args, "wait", False):
            job = _wait(client, job)
    except ApiError as e:
        print(f"graceful backfill: error: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:  # connection refused, timeout...
        print(f"graceful backfill: error: cannot reach {args.api}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(job, indent=2) if args.json else describe(job))
    return 1 if job["status"] in ("failed", "cancelled") and getattr(args, "wait", False) else 0
