"""Training on several processes under torchrun: process group, sharding of global batches, synchronised
BatchNorm, all-reduce of metrics and rank-0-only writing (trainer.train uses it; plain runs never touch it).

A run is distributed only when torchrun's environment says so (``WORLD_SIZE`` > 1 with ``RANK`` and
``LOCAL_RANK``). Every rank then draws the same seeded permutation of the training set per epoch and takes
its share of each *global* batch (the configured batch size), so the sequence of global batches, the
augmentation of each image and the optimiser's steps are those of single-process training:

- each rank's loss is its share's sum of per-sample terms times ``world / global batch``, so DDP's average
  of the ranks' gradients is the gradient of the global batch's mean, also when the last batch of an
  epoch splits unevenly;
- BatchNorm layers compute their training statistics over the global batch (``sync_batchnorm``): torch's
  ``SyncBatchNorm`` on CUDA, ``_CpuSyncBatchNorm`` below on the CPU (torch's refuses CPU tensors).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

# How long the other ranks wait for rank 0 to save and evaluate the model after training (a collective of
# the training itself keeps torch's default timeout, so a hung step still fails soon).
FINISH_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Dist:
    """Where this process stands: ``rank`` of ``world_size`` processes (1: a plain run, no process group).

    ``control`` is a gloo group for barriers (works beside nccl); ``bn_group`` the group CPU BatchNorm
    statistics are summed over. Both None in a plain run.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    control: object | None = None
    bn_group: object | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the model folder, logs progress and evaluates."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a plain run)."""
        if self.active:
            dist.barrier(group=self.control)  # type: ignore[arg-type]

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum of ``t`` over the ranks (no gradient), returned."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


PLAIN = Dist()


def env_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment, or None for a plain run."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1 or "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"])


def is_main_process() -> bool:
    """False only on a torchrun rank other than 0 (callers print for people only where this holds)."""
    env = env_world()
    return env is None or env[0] == 0


def device_for(name: str, local_rank: int) -> str:
    """The device a rank trains on: ``cuda`` becomes this rank's GPU (``cuda:LOCAL_RANK``)."""
    if name == "cuda":
        return f"cuda:{local_rank}"
    if name.startswith("cuda:"):
        raise ConfigError(
            f"--device {name} under torchrun: pass --device cuda, each process takes the GPU of its LOCAL_RANK"
        )
    return name


@contextmanager
def session(device: str) -> Iterator[Dist]:
    """The process group for one training run: initialised from torchrun's environment (gloo on the CPU,
    nccl with CUDA) and torn down after; a plain ``Dist`` without torchrun. A group someone else
    initialised is used as it is and left alone. Ranks other than 0 log only warnings meanwhile."""
    env = env_world()
    if env is None:
        yield PLAIN
        return
    rank, world, local_rank = env
    backend = "nccl" if device.startswith("cuda") else "gloo"
    owned = not dist.is_initialized()
    if owned:
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    elif dist.get_world_size() != world:
        raise ConfigError(f"a process group of {dist.get_world_size()} ranks, but WORLD_SIZE={world}")
    # new_group is collective: every rank creates the same groups in the same order.
    control = dist.new_group(backend="gloo", timeout=FINISH_TIMEOUT)
    bn_group = dist.new_group(backend="gloo") if backend == "gloo" else None
    quiet = logging.getLogger("trainer")
    level = quiet.level
    if rank != 0:
        quiet.setLevel(logging.WARNING)
    try:
        yield Dist(rank, world, local_rank, backend, control, bn_group)
    finally:
        quiet.setLevel(level)
        if owned:
            dist.destroy_process_group()


@dataclass(frozen=True)
class Share:
    """One rank's share of a global batch of ``size`` images: ``positions`` (c,) in the global batch, of which
    ``valid`` (c,) are real (padding repeats a real one, so every rank loads ``c`` rows)."""

    size: int
    positions: torch.Tensor
    valid: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.valid.sum())

    def weight(self, world: int) -> float:
        """Factor on the share's mean of a per-sample term such that DDP's average over the ``world`` ranks
        is the global batch's mean: count * world / size (1 when the shares are equal)."""
        return self.count * world / self.size


def check_shards(n: int, batch_size: int, world: int, what: str = "training images") -> None:
    """Refuse a split DDP cannot take evenly: every rank needs an equal number of loaded rows per full batch,
    and at least one image of the last one."""
    if batch_size % world:
        raise ConfigError(
            f"--batch-size {batch_size} does not split into {world} processes: pass a multiple of {world}"
        )
    if 0 < n % batch_size < world:
        raise ConfigError(
            f"the last batch of each epoch holds {n % batch_size} of the {n} {what}, fewer than the "
            f"{world} processes (each needs at least one): change the batch size or the number of images"
        )


def shard_batches(
    order: torch.Tensor, batch_size: int, rank: int, world: int
) -> tuple[torch.Tensor, list[Share]]:
    """This rank's indices of each global batch of ``order`` (N,), as one (S*c,) order for the loader (full
    batches give ``batch_size // world`` rows, the last ``ceil(r / world)``), and each step's ``Share``.

    Rank k takes positions ``[k*n//world, (k+1)*n//world)`` of a global batch of n: contiguous, sizes differing
    by at most one, none empty while n >= world.
    """
    local: list[torch.Tensor] = []
    shares: list[Share] = []
    for i in range(0, len(order), batch_size):
        g = order[i : i + batch_size]
        n = len(g)
        c = -(-n // world)
        lo, hi = rank * n // world, (rank + 1) * n // world
        pos = torch.arange(lo, lo + c).clamp(max=max(hi - 1, 0))  # padding repeats the last real row
        valid = torch.arange(lo, lo + c) < hi
        local.append(g[pos])
        shares.append(Share(n, pos, valid))
    return (torch.cat(local) if local else order[:0]), shares


def global_view(local: torch.Tensor, share: Share) -> torch.Tensor:
    """(c, ...) rows of this rank's share -> (n, ...) global batch, zero outside the share (for draws that
    must be made over the whole global batch, e.g. augmentation)."""
    out = local.new_zeros((share.size, *local.shape[1:]))
    out[share.positions[share.valid]] = local[share.valid]
    return out


def local_rows(full: torch.Tensor, share: Share) -> torch.Tensor:
    """(n, ...) global batch -> (m, ...) the valid rows of this rank's share."""
    return full[share.positions[share.valid]]


class _AllReduceSum(torch.autograd.Function):
    """Sum of a tensor over ``group`` with a gradient: the gradient of a sum of every rank's loss with
    respect to each rank's input is the sum of the ranks' upstream gradients (another all-reduce)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: object) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)  # type: ignore[arg-type]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _AllReduceSum.apply(grad, ctx.group), None


def differentiable_all_reduce(tensor: torch.Tensor, group: object) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)  # type: ignore[no-any-return]


class _CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (any dims) whose training statistics are those of the global batch across ``group``: sums
    are all-reduced differentiably (_AllReduceSum), so gradients through the mean and variance
    reach every rank. Shares its parameters and running buffers with the layer it stands in for.
    Two-pass variance (mean first), as numerically close to ``F.batch_norm`` on one process as we can get."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, group: object) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(self, name, getattr(bn, name))
        self.group = group
        self.train(bn.training)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {input.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, ...) -> (B, C, ...)
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        dims = [0, *range(2, x.dim())]
        c = x.shape[1]
        shape = (1, c) + (1,) * (x.dim() - 2)
        count = x.new_full((1,), x.numel() / max(c, 1))
        first = differentiable_all_reduce(torch.cat([x.sum(dims), count]), group=self.group)  # (C+1,)
        n = first[c].detach()
        mean = first[:c] / n  # (C,)
        centred = x - mean.view(shape)
        var = differentiable_all_reduce(centred.pow(2).sum(dims), group=self.group) / n  # (C,) biased
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def sync_batchnorm(model: nn.Module, ctx: Dist) -> Callable[[], None]:
    """Swap ``model``'s BatchNorm layers for synchronised ones sharing their parameters and buffers (so the
    trained values land in the original layers); returns the function that puts the originals back.

    Only torch's own BatchNorm1d/2d/3d are swapped; a library's subclass (e.g. timm's BatchNormAct2d) keeps
    per-rank statistics (logged), which then differ from single-process training's.
    """
    if not ctx.active:
        return lambda: None
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    others = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in _PLAIN_BN:
                if ctx.bn_group is not None:
                    new: nn.Module = _CpuSyncBatchNorm(child, ctx.bn_group)  # type: ignore[arg-type]
                else:
                    new = nn.SyncBatchNorm(
                        child.num_features,  # type: ignore[arg-type]
                        child.eps,  # type: ignore[arg-type]
                        child.momentum,  # type: ignore[arg-type]
                        child.affine,  # type: ignore[arg-type]
                        child.track_running_stats,  # type: ignore[arg-type]
                    )
                    new.weight, new.bias = child.weight, child.bias
                    for buf in ("running_mean", "running_var", "num_batches_tracked"):
                        setattr(new, buf, getattr(child, buf))
                    new.train(child.training)
                setattr(parent, name, new)
                swapped.append((parent, name, child))
            elif isinstance(child, nn.modules.batchnorm._NormBase) and not isinstance(
                child, _CpuSyncBatchNorm | nn.SyncBatchNorm
            ):
                others += 1
    if others:
        log.warning("%d norm layers of a library's own kind keep per-rank batch statistics", others)

    def restore() -> None:
        for parent, name, child in swapped:
            setattr(parent, name, child)

    return restore
