"""Adapters: compatibility after the fact, for a new model trained *without* BCT.

From a sample of items embedded by both models (X: new embeddings, Y: old embeddings of the same items),
learn a map f with f(new(x)) ~ old(x), so queries embedded by the new model and mapped by f can search a
gallery the old model embedded. Three kinds (Drift-Adapter, 2025, compares the same family):

- ``procrustes``: orthogonal W minimising ||X W^T - Y||_F, closed form via the SVD of X^T Y. Keeps norms and
  angles, so it cannot distort the new space; few degrees of freedom, so a small sample suffices.
- ``affine``: W, b by least squares on [X, 1]. More freedom (scales, shears, an offset).
- ``mlp``: the affine map plus a residual MLP, ``W x + b + MLP(x)``, trained on the cosine between f(x) and
  y. Drift-Adapter's residual MLP adds the MLP to the identity; between two independently trained models the
  identity means nothing, so the skip path here is the closed-form affine fit and the MLP starts at zero.

Fitting is done in float64 numpy for the closed forms (exact to ~1e-12) and in torch for the MLP.
``AdaptedModel`` glues a loaded new model and an adapter into one model whose ``embed`` writes old-space
embeddings; ``trainer.artifact`` saves and loads it as a model version of its own.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import ConfigError
from trainer.model import CosineHead, EmbeddingModel

log = logging.getLogger(__name__)

ADAPTER_KINDS = ("procrustes", "affine", "mlp")


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of an adapter, stored in the adapter version's card as ``arch``.

    ``embedding_dim`` is the output (old space) size, ``in_dim`` the new model's; ``scale`` is the cosine scale
    of the nearest-class-mean head the adapter version carries (see ``class_mean_head``).
    """

    kind: str
    in_dim: int
    embedding_dim: int
    hidden: int = 0
    scale: float = 16.0
    name: str = "adapter"

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ConfigError(f"unknown adapter kind {self.kind!r}: choose one of {', '.join(ADAPTER_KINDS)}")
        if self.in_dim < 1 or self.embedding_dim < 1 or (self.kind == "mlp" and self.hidden < 1):
            raise ConfigError(
                f"adapter sizes must be >= 1 (in {self.in_dim}, out {self.embedding_dim}, "
                f"hidden {self.hidden})"
            )
        if self.name != "adapter":
            raise ConfigError(f"not an adapter config (name {self.name!r})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class EmbeddingAdapter(nn.Module):
    """(B, D_in) new-space embeddings -> (B, D_out) old-space vectors (not yet normalised)."""

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.linear = nn.Linear(cfg.in_dim, cfg.embedding_dim, bias=cfg.kind != "procrustes")
        self.mlp: nn.Module | None = None
        if cfg.kind == "mlp":
            self.mlp = nn.Sequential(
                nn.Linear(cfg.in_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.embedding_dim)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)  # (B, D_out)
        if self.mlp is not None:
            y = y + self.mlp(x)  # (B, D_out): the non-linear residual on top of the affine map
        return y


class AdaptedModel(nn.Module):
    """A new model followed by an adapter: ``embed(x) = normalize(adapter(new.embed(x)))``, in the old space.

    ``classify`` is a cosine head over the adapter's output space whose rows are the class means of the adapted
    sample (a nearest-class-mean classifier): the new model's own head lives in the new space, and the old
    model's head may not know every class. Only ``adapter`` and ``head`` are the version's own weights.
    """

    def __init__(
        self, base: EmbeddingModel, adapter: EmbeddingAdapter, head: CosineHead, classes: list[int]
    ) -> None:
        super().__init__()
        if head.weight.shape[0] != len(classes):
            raise ConfigError(f"{head.weight.shape[0]} head rows for {len(classes)} classes")
        self.base = base
        self.adapter = adapter
        self.head = head
        self.classes = list(classes)
        self.fused = False

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised floats -> (B, D_old) unit-norm embeddings in the old space."""
        if self.fused:
            return self.base.embed(x)  # the adapter lives in the base's projection (see ``fuse``)
        return F.normalize(self.adapter(self.base.embed(x)), dim=1)

    @torch.no_grad()
    def fuse(self) -> bool:
        """Fold a square orthogonal (procrustes) adapter into the base model's last projection: zero added
        latency. Exact: the backbone ends ``normalize(P h + c)`` and an orthogonal W keeps norms, so
        ``normalize(W normalize(P h + c)) = normalize(W P h + W c)``. Other kinds (a bias after the base's
        normalisation, or a non-linearity) cannot be folded; returns whether it fused. Changes ``base`` in place,
        so call it only on a base model this adapted model owns; ``adapter`` keeps its own weights."""
        w = self.adapter.linear.weight  # (D_out, D_in)
        proj = getattr(getattr(self.base, "backbone", None), "proj", None)
        if (
            self.fused
            or self.adapter.cfg.kind != "procrustes"
            or w.shape[0] != w.shape[1]
            or not isinstance(proj, nn.Linear)
        ):
            return self.fused
        if not torch.allclose(
            w @ w.T, torch.eye(w.shape[0]), atol=1e-4
        ):  # not orthogonal: folding would be wrong
            return False
        proj.weight.copy_(w @ proj.weight)  # (D_out, C')
        if proj.bias is not None:
            proj.bias.copy_(w @ proj.bias)  # (D_out,)
        self.fused = True
        return True

    def classify(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D_old) adapted embeddings -> (B, K) nearest-class-mean logits over ``self.classes``."""
        return self.head(emb)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(x)
        return emb, self.classify(emb)

    def own_state(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter version stores (the new model's weights stay in its own folder)."""
        return {
            **{f"adapter.{k}": v for k, v in self.adapter.state_dict().items()},
            "head.weight": self.head.weight,
        }


# ----------------------------------------------------------------------------------------------- fitting
def _check_pairs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ConfigError(f"adapter fit needs (N, D_new) and (N, D_old) pairs, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ConfigError(f"adapter fit needs at least 2 pairs, got {len(x)}")
    return x, y


def fit_procrustes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(D_out, D_in) orthogonal W (orthonormal rows or columns when sizes differ) minimising ||x W^T - y||_F.

    Orthogonal Procrustes: with U S V^T the SVD of x^T y (D_in, D_out), W^T = U V^T.
    """
    x, y = _check_pairs(x, y)
    u, _, vt = np.linalg.svd(x.T @ y, full_matrices=False)  # (D_in, r), (r,), (r, D_out)
    return (u @ vt).T  # (D_out, D_in)


def fit_affine(x: np.ndarray, y: np.ndarray, ridge: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(D_out, D_in) W and (D_out,) b minimising ||x W^T + b - y||^2 (+ ridge ||W||^2), by least squares."""
    x, y = _check_pairs(x, y)
    xa = np.hstack([x, np.ones((len(x), 1))])  # (N, D_in + 1)
    if ridge > 0:
        reg = np.sqrt(ridge) * np.eye(xa.shape[1])
        reg[-1, -1] = 0.0  # the offset is not shrunk
        xa, y = np.vstack([xa, reg]), np.vstack([y, np.zeros((xa.shape[1], y.shape[1]))])
    sol, *_ = np.linalg.lstsq(xa, y, rcond=None)  # (D_in + 1, D_out)
    return sol[:-1].T, sol[-1]


@dataclass(frozen=True)
class MLPFit:
    """How the residual MLP is trained: Adam on 1 - cos(f(x), y), early-stopped on a held-out slice."""

    hidden: int = 256
    steps: int = 3000
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    holdout: float = 0.1
    eval_every: int = 100
    seed: int = 0


def _cosine_loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(pred, y, dim=1)).mean()


def fit_mlp(
    x: np.ndarray, y: np.ndarray, fit: MLPFit | None = None
) -> tuple[EmbeddingAdapter, dict[str, float]]:
    """An ``mlp`` adapter: the affine least-squares map, plus a residual MLP (last layer zero-initialised, so
    it starts exactly at the affine fit) trained on the cosine to ``y``. Returns it and fit diagnostics."""
    threads = torch.get_num_threads()
    # The matrices are tiny: one thread avoids the OpenMP hand-offs that dominate each step (by 10-100x on a
    # busy machine).
    torch.set_num_threads(1)
    try:
        return _fit_mlp(x, y, fit or MLPFit())
    finally:
        torch.set_num_threads(threads)


def _fit_mlp(x: np.ndarray, y: np.ndarray, fit: MLPFit) -> tuple[EmbeddingAdapter, dict[str, float]]:
    x64, y64 = _check_pairs(x, y)
    gen = torch.Generator().manual_seed(fit.seed)
    n = len(x64)
    order = torch.randperm(n, generator=gen)
    n_val = int(round(n * fit.holdout)) if n >= 20 else 0
    val, tr = order[:n_val], order[n_val:]
    w, b = fit_affine(x64[tr.numpy()], y64[tr.numpy()], ridge=1e-3)
    torch.manual_seed(fit.seed)
    adapter = EmbeddingAdapter(
        AdapterConfig(kind="mlp", in_dim=x64.shape[1], embedding_dim=y64.shape[1], hidden=fit.hidden)
    )
    with torch.no_grad():
        adapter.linear.weight.copy_(torch.from_numpy(w))
        adapter.linear.bias.copy_(torch.from_numpy(b))
        assert adapter.mlp is not None
        adapter.mlp[2].weight.zero_()  # type: ignore[index]
        adapter.mlp[2].bias.zero_()  # type: ignore[index]
    xt, yt = torch.from_numpy(x64).float(), torch.from_numpy(y64).float()  # (N, D_in), (N, D_out)
    opt = torch.optim.AdamW(adapter.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=fit.steps)

    def val_loss() -> float:
        if not n_val:
            return float("nan")
        with torch.no_grad():
            return float(_cosine_loss(adapter(xt[val]), yt[val]))

    start = val_loss()
    best, best_state, best_step = start, {k: v.clone() for k, v in adapter.state_dict().items()}, 0
    adapter.train()
    for step in range(1, fit.steps + 1):
        idx = tr[torch.randint(len(tr), (min(fit.batch_size, len(tr)),), generator=gen)]
        loss = _cosine_loss(adapter(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if n_val and (step % fit.eval_every == 0 or step == fit.steps):
            v = val_loss()
            if v < best:
                best, best_state, best_step = v, {k: t.clone() for k, t in adapter.state_dict().items()}, step
    if n_val:  # keep the step with the best held-out cosine (the affine start if the MLP only overfits)
        adapter.load_state_dict(best_state)
    else:
        best_step = fit.steps
    adapter.eval()
    return adapter, {
        "holdout_cos_loss_affine": start,
        "holdout_cos_loss": best,
        "best_step": float(best_step),
        "holdout": float(n_val),
    }


def fit_adapter(
    kind: str, x: np.ndarray, y: np.ndarray, mlp: MLPFit | None = None
) -> tuple[EmbeddingAdapter, dict[str, float]]:
    """Fit an adapter of ``kind`` on (N, D_new) ``x`` -> (N, D_old) ``y``; returns it (eval mode) and diagnostics
    (mean squared error and mean cosine of the fit on the sample)."""
    x64, y64 = _check_pairs(x, y)
    if kind == "mlp":
        adapter, info = fit_mlp(x64, y64, mlp)
    else:
        adapter = EmbeddingAdapter(AdapterConfig(kind=kind, in_dim=x64.shape[1], embedding_dim=y64.shape[1]))
        with torch.no_grad():
            if kind == "procrustes":
                adapter.linear.weight.copy_(torch.from_numpy(fit_procrustes(x64, y64)))
            else:
                w, b = fit_affine(x64, y64)
                adapter.linear.weight.copy_(torch.from_numpy(w))
                adapter.linear.bias.copy_(torch.from_numpy(b))
        adapter.eval()
        info = {}
    with torch.no_grad():
        pred = adapter(torch.from_numpy(x64).float())  # (N, D_out)
        yt = torch.from_numpy(y64).float()
        info["sample_mse"] = float((pred - yt).pow(2).sum(1).mean())
        info["sample_cos"] = float(F.cosine_similarity(pred, yt, dim=1).mean())
    return adapter.requires_grad_(False), info


def class_mean_head(
    emb: np.ndarray, labels: np.ndarray, classes: list[int], scale: float
) -> tuple[CosineHead, list[int]]:
    """A cosine head whose rows are the mean (N, D) embedding of each class in ``classes`` that has examples.

    Returns the head and the classes it has rows for (those with at least one example, in ``classes`` order).
    """
    present = [c for c in classes if (labels == c).any()]
    if not present:
        raise ConfigError("no labelled example of any of the model's classes in the sample")
    rows = np.stack([emb[labels == c].mean(0) for c in present])  # (K, D)
    head = CosineHead(emb.shape[1], len(present), scale)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(rows).float())
    return head.requires_grad_(False).eval(), present
