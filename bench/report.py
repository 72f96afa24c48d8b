"""Writing one benchmark's section into BENCHMARKS.md, keeping every other section as it is."""

from __future__ import annotations

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
    import os

    import torch

    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Run {now} on {platform.machine()} with {os.cpu_count()} CPUs (shared, noisy), Python "
            f"{sys.version.split()[0]}, torch {torch.__version__} ({torch.get_num_threads()} threads).")


def command_line() -> str:
    args = " ".join(sys.argv[1:])
    return f"`.venv/bin/python bench/{Path(sys.argv[0]).name}{(' ' + args) if args else ''}`"
