"""`graceful check VERSION`: measure a candidate against a running service's gallery before activating it.

    graceful check v2 [--api URL] [--json]

Prints the verdict and the figures the service's compatibility check measured (POST
/v1/models/{version}/check); exits 0 when the candidate passes, 1 when it fails or cannot be checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_API = "http://127.0.0.1:8000"


def describe(r: dict[str, Any]) -> str:
    """The check as lines for a person."""
    lines = [f"{r['candidate']}: {'PASSES' if r['passed'] else 'FAILS'} ({r.get('method')})"]
    if r.get("criterion"):
        lines.append(f"  criterion: {r['criterion']}")
    if r.get("reason"):
        lines.append(f"  reason: {r['reason']}")
    if r.get("method") != "measured":
        if r.get("detail"):
            lines.append(f"  {r['detail']}")
        return "\n".join(lines)
    s, u = r["sample"], r["unlabelled"]
    lines.append(
        f"  sample: {s['queries']} gallery items as queries over {s['gallery']} stored items "
        f"(active model {r['active']}), {r.get('seconds', 0):.1f} s"
    )
    lines.append(
        f"  overlap@10 with the active model's results: {u['overlap_at_10']:.3f} "
        f"(random baseline {u['baseline']['overlap_at_10']:.3f}); active top-1 lost: "
        f"{u['lost_top1']:.3f} (baseline {u['baseline']['lost_top1']:.3f})"
    )
    lab = r.get("labelled")
    if lab:
        a, c = lab["active"], lab["candidate"]
        lines.append(f"  {'':12} {'top-1':>7} {'top-5':>7} {'mAP':>7}    ({lab['queries']} labelled queries)")
        lines.append(f"  {'active':12} {a['top1']:7.4f} {a['top5']:7.4f} {a['mAP']:7.4f}")
        lines.append(f"  {'candidate':12} {c['top1']:7.4f} {c['top5']:7.4f} {c['mAP']:7.4f}")
        rf = lab.get("retrieval_flips") or {}
        counts = (
            (f" ({rf['n_negative']} of {rf['n']})", f" ({rf['n_positive']} of {rf['n']})")
            if "n" in rf
            else ("", "")
        )
        lines.append(
            f"  retrieval flips: negative {lab['negative_flip_rate']:.4f}{counts[0]}, positive "
            f"{lab['positive_flip_rate']:.4f}{counts[1]}"
        )
        for name, part in lab.get("by_class", {}).items():
            lines.append(
                f"  {name + ' classes':12} active mAP {part['active']['mAP']:.4f}, candidate mAP "
                f"{part['candidate']['mAP']:.4f} ({part['queries']} queries)"
            )
    return "\n".join(lines)


def check_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="graceful check",
        description="Measure a candidate version against a running "
        "service's gallery (API key from GRACEFUL_API_KEY).",
    )
    p.add_argument("version")
    p.add_argument(
        "--api",
        default=os.environ.get("GRACEFUL_API_URL", DEFAULT_API),
        help="the service's base URL (default: $GRACEFUL_API_URL, else %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the check as JSON")
    args = p.parse_args(argv)
    import httpx

    from service.console.client import ApiError, GracefulClient

    client = GracefulClient(args.api, os.environ.get("GRACEFUL_API_KEY") or None)
    try:
        result = client.post(f"/v1/models/{args.version}/check")
    except ApiError as e:
        print(f"graceful check: error: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"graceful check: error: cannot reach {args.api}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else describe(result))
    return 0 if result.get("passed") else 1
