"""The v1 / v2 (BCT child) pair the service-side benchmarks run on."""

from __future__ import annotations

from pathlib import Path

from trainer.train import TrainConfig, reusable, train

REPO = Path(__file__).resolve().parents[1]


def compat_seed(seed: int) -> Path:
    """bench/compat.py's model folders of one seed (full protocol, default --out)."""
    return REPO / "bench" / "out" / "compat" / "full" / f"seed{seed}"


COMPAT_SEED0 = compat_seed(0)


def v1_v2_models(name: str, quick: bool) -> Path:
    """bench/compat.py's seed-0 v1 and v2 when present (full runs), else trained (reused when settings match)
    under bench/out/<name>/ with the same settings (quick: 1 epoch on a 5k slice)."""
    if (COMPAT_SEED0 / "v1" / "card.json").exists() and (COMPAT_SEED0 / "v2" / "card.json").exists() and not quick:
        return COMPAT_SEED0
    root = REPO / "bench" / "out" / name / ("quick" if quick else "full")
    limit = 5000 if quick else None
    cfgs = [TrainConfig(out=str(root / "v1"), classes="0-4", epochs=1 if quick else 6, limit=limit),
            TrainConfig(out=str(root / "v2"), old=str(root / "v1"), bct="full", epochs=1 if quick else 12,
                        limit=limit)]
    for cfg in cfgs:
        if not reusable(cfg):
            print(f"training {cfg.out}", flush=True)
            train(cfg)
    return root
