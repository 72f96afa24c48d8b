"""What the benchmarks share: writing a section of BENCHMARKS.md, the machine and command lines, and the
v1 / v2 (BCT child) model pair the service-side benchmarks run on. Run a benchmark as ``python -m bench.NAME``.
"""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"


def write_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace the ``## {title}`` section of ``path`` (or append it). ``body`` includes the heading."""
    heading = f"## {title}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == heading), None)
    section = body.rstrip("\n") + "\n"
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    path.write_text(new)


def machine_line() -> str:
    import torch

    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Run {now} on {platform.machine()} with {os.cpu_count()} CPUs (shared, noisy), Python "
        f"{sys.version.split()[0]}, torch {torch.__version__} ({torch.get_num_threads()} threads)."
    )


def command_line() -> str:
    args = " ".join(sys.argv[1:])
    return f"`.venv/bin/python -m bench.{Path(sys.argv[0]).stem}{(' ' + args) if args else ''}`"


def compat_seed(seed: int) -> Path:
    """The closed-world v1 / v2 pair of one seed (classes 0-4 / 0-9, 6 / 12 epochs, the full recipe) as
    bench/compat.py wrote it before its open-world splits; reused when present. compat.py now writes its
    splits beside it (bench/out/compat/<OLD>_<NEW>/)."""
    return REPO / "bench" / "out" / "compat" / "full" / f"seed{seed}"


COMPAT_SEED0 = compat_seed(0)


def v1_v2_models(name: str, quick: bool) -> Path:
    """bench/compat.py's seed-0 v1 and v2 when present (full runs), else trained (reused when settings match)
    under bench/out/pair/ with the same settings (quick: 1 epoch on a 5k slice), shared by every benchmark
    that asks (``name`` only says who asked)."""
    from trainer.train import TrainConfig, reusable, train

    if (
        (COMPAT_SEED0 / "v1" / "card.json").exists()
        and (COMPAT_SEED0 / "v2" / "card.json").exists()
        and not quick
    ):
        return COMPAT_SEED0
    root = REPO / "bench" / "out" / "pair" / ("quick" if quick else "full")
    limit = 5000 if quick else None
    cfgs = [
        TrainConfig(out=str(root / "v1"), classes="0-4", epochs=1 if quick else 6, limit=limit),
        TrainConfig(
            out=str(root / "v2"), old=str(root / "v1"), bct="full", epochs=1 if quick else 12, limit=limit
        ),
    ]
    for cfg in cfgs:
        if not reusable(cfg):
            print(f"training {cfg.out} (for {name})", flush=True)
            train(cfg)
    return root
