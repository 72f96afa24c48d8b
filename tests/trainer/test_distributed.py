"""Training under torchrun (trainer.distributed): two gloo processes on the CPU train the same weights as one.

Tolerance: the saved tensors (parameters and BatchNorm running statistics) of a 2-process run differ from a
single-process run of the same config by at most 1e-4 of each tensor's largest magnitude, and embeddings of
a fixed batch by at most 1e-4. Measured on this tiny config: 2e-7 absolute for plain training, 2e-6
absolute / 5e-6 relative for BCT + PC + unlabeled (float32 sums taken in another order: per rank, then
all-reduced; SGD over 8 steps does not amplify them). Each global batch, the images in it, their
augmentation and the BatchNorm statistics are the same as one process's, so only rounding differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.artifact import load_model
from trainer.data import load_split
from trainer.distributed import check_shards, shard_batches
from trainer.errors import ConfigError
from trainer.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
# 201 images in batches of 64: the last batch (9) splits 4/5, so unequal shares are exercised; 131 unlabeled
# images in the pull's batches of 128 leave 3 (1/2).
COMMON = dict(arch="small", epochs=2, batch_size=64, limit=201, eval_limit=100, threads=1)
TOL = 1e-4


def _flags(cfg: dict[str, object]) -> list[str]:
    out: list[str] = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


def _torchrun(cfg: dict[str, object], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node N --standalone -m trainer.cli train ...`` (gloo on the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"]
    cmd += ["-m", "trainer.cli", "train", "--quiet", *_flags(cfg)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _assert_same_weights(a: Path, b: Path) -> float:
    """Every saved tensor within TOL of its largest magnitude; returns the largest relative difference."""
    wa, wb = load_file(a / "weights.safetensors"), load_file(b / "weights.safetensors")
    assert wa.keys() == wb.keys()
    worst = 0.0
    for k, t in wa.items():
        if not t.is_floating_point():
            assert torch.equal(t, wb[k]), k  # num_batches_tracked: the same number of steps
            continue
        diff = float((t.double() - wb[k].double()).abs().max())
        rel = diff / max(float(t.double().abs().max()), 1e-12)
        assert rel <= TOL, f"{k}: max abs diff {diff:.3g} ({rel:.3g} of its largest value)"
        worst = max(worst, rel)
    return worst


def _assert_same_embeddings(a: Path, b: Path, data: Path) -> None:
    x = torch.from_numpy(load_split(data, "test").images[:64])
    ma, mb = load_model(a), load_model(b)
    with torch.no_grad():
        ea, eb = ma.model.embed(ma.preprocess(x)), mb.model.embed(mb.preprocess(x))  # (64, D) unit norm
    assert float((ea - eb).abs().max()) <= TOL


def _world_size(folder: Path) -> int:
    return json.loads((folder / "card.json").read_text())["train_config"]["world_size"]


@pytest.fixture(scope="module")
def old_model(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp-old") / "v1"
    train(TrainConfig(out=str(out), data=str(tiny_data), classes="0-4", **{**COMMON, "epochs": 1}))
    return out


def test_each_global_batch_is_split_once_over_the_ranks():
    order = torch.randperm(201, generator=torch.Generator().manual_seed(0))
    world = 3
    parts = [shard_batches(order, 63, r, world) for r in range(world)]
    for step in range(4):  # 63, 63, 63, 12 images
        size = parts[0][1][step].size
        got = []
        for local, shares in parts:
            share = shares[step]
            assert share.size == size and share.count >= size // world
            start = sum(len(s.positions) for s in shares[:step])
            rows = local[start : start + len(share.positions)]
            got += rows[share.valid].tolist()
        assert got == order[step * 63 : step * 63 + size].tolist()  # the global batch, in order, once
    # shares of 4 images each of the last batch: weights sum to the world size (DDP's average: the mean)
    assert sum(shares[3].weight(world) for _, shares in parts) == pytest.approx(world)


def test_a_split_ddp_cannot_take_is_refused():
    with pytest.raises(ConfigError, match="multiple of 2"):
        check_shards(100, 63, 2)
    with pytest.raises(ConfigError, match="fewer than the 4 processes"):
        check_shards(130, 64, 4)
    check_shards(131, 64, 2)  # last batch 3: shares of 1 and 2


def test_a_plain_run_records_world_size_1(tiny_data, tmp_path, monkeypatch, one_thread):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "plain"
    result = train(TrainConfig(out=str(out), data=str(tiny_data), **{**COMMON, "epochs": 1, "limit": 64}))
    assert result.card.train_config["world_size"] == 1 and _world_size(out) == 1


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one(tiny_data, tmp_path, one_thread):
    cfg = {"data": str(tiny_data), **COMMON}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train(TrainConfig(out=str(single), **cfg))  # type: ignore[arg-type]
    done = _torchrun({"out": str(ddp), **cfg})
    assert done.stdout.count("saved ddp") == 1  # rank 0 alone prints
    assert _world_size(ddp) == 2 and _world_size(single) == 1
    _assert_same_weights(single, ddp)
    _assert_same_embeddings(single, ddp, tiny_data)


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True], ids=["old-model-each-step", "cached-old-logits"])
def test_two_processes_train_bct_pc_and_the_unlabeled_pull_as_one(
    tiny_data, old_model, tmp_path, one_thread, cached
):
    # cached: the old model's outputs computed once and looked up by each share's dataset indices
    cfg = {
        "data": str(tiny_data),
        "old": str(old_model),
        "bct": "full",
        "pc": "fd-kl",
        "unlabeled": str(tiny_data),
        "unlabeled_limit": 131,
        **({"cache_old_logits": True} if cached else {}),
        **COMMON,
    }
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    result = train(TrainConfig(out=str(single), **cfg))  # type: ignore[arg-type]
    assert {"influence", "fd_kl", "unlabeled"} <= set(result.history[-1])
    _torchrun({"out": str(ddp), **cfg})
    card = json.loads((ddp / "card.json").read_text())
    assert card["compatible_with"] == "v1" and card["train_config"]["world_size"] == 2
    _assert_same_weights(single, ddp)
    _assert_same_embeddings(single, ddp, tiny_data)
