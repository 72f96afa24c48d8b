"""Training losses. Each returns named terms (``{"task": ..., "influence": ...}``) so logs show every part.

BCT (Shen et al., CVPR 2020): the new model's embedding is fed to the *old* model's frozen classifier, so the
new embedding must stay where the old classifier expects each class: in the old embedding space.
PC training (Yan et al., CVPR 2021): focal distillation pulls the new model's logits towards the old
model's, most on the images the old model classifies right, so the update brings few new mistakes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import ConfigError, IncompatibleModelsError
from trainer.model import CosineHead, EmbeddingModel


def task_loss(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, K) logits against (B,) head rows."""
    return F.cross_entropy(logits, rows)


class OldHead(nn.Module):
    """The old model's frozen cosine head, extended with synthesised rows for classes it never saw.

    Rows are ordered as ``classes`` (the new model's classes). ``old`` is the old model's own head module,
    frozen in place (``requires_grad_(False)`` and ``eval()``), so a training step cannot change it.
    """

    def __init__(
        self, old: CosineHead, old_classes: list[int], classes: list[int], synthesized: torch.Tensor
    ) -> None:
        super().__init__()
        self.old = old.requires_grad_(False).eval()
        self.scale = old.scale
        # (K,) index into old rows, -1 where the row is synthesised; (K,) index into synthesized rows.
        old_row = {c: i for i, c in enumerate(old_classes)}
        new_only = [c for c in classes if c not in old_row]
        if synthesized.shape[0] != len(new_only):
            raise IncompatibleModelsError(
                f"{synthesized.shape[0]} synthesised rows for {len(new_only)} new classes"
            )
        self.register_buffer("synthesized", synthesized.detach().clone())  # (K_new, D)
        self.register_buffer("old_index", torch.tensor([old_row.get(c, -1) for c in classes]))
        self.register_buffer(
            "syn_index", torch.tensor([new_only.index(c) if c not in old_row else -1 for c in classes])
        )

    def train(
        self, mode: bool = True
    ) -> OldHead:  # the old head stays in eval mode whatever the trainer does
        super().train(mode)
        self.old.eval()
        return self

    def weight(self) -> torch.Tensor:
        """(K, D) classifier rows over the new classes: old rows where known, synthesised otherwise."""
        old_w = self.old.weight[self.old_index.clamp(min=0)]
        syn_w = self.synthesized[self.syn_index.clamp(min=0)] if self.synthesized.numel() else old_w
        return torch.where((self.old_index >= 0)[:, None], old_w, syn_w)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D) new embeddings -> (B, K) logits under the old classifier."""
        return self.scale * F.normalize(emb, dim=1) @ F.normalize(self.weight(), dim=1).T


@torch.no_grad()
def embed_rows(
    model: EmbeddingModel, batches, classes: list[int], dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) embeddings of the images in ``batches`` (inputs (B, C, H, W), labels (B,)) whose label is in
    ``classes``, and (N,) their rows in ``classes``. One pass of the model in eval mode."""
    pos = {c: i for i, c in enumerate(classes)}
    embs, rows = [torch.zeros(0, dim)], [torch.zeros(0, dtype=torch.long)]
    was_training = model.training
    model.eval()
    for x, y in batches:
        keep = torch.tensor([int(v) in pos for v in y], dtype=torch.bool)
        if keep.any():
            embs.append(model.embed(x[keep]))
            rows.append(torch.tensor([pos[int(v)] for v in y[keep]]))
    model.train(was_training)
    return torch.cat(embs), torch.cat(rows)


def class_means(emb: torch.Tensor, rows: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Mean of (N, D) embeddings per row of ``classes``, (K, D). Raises if a class has no example."""
    sums = torch.zeros(len(classes), emb.shape[1]).index_add_(0, rows, emb)
    counts = torch.zeros(len(classes)).index_add_(0, rows, torch.ones(len(rows)))
    if (counts == 0).any():
        missing = [c for c, n in zip(classes, counts.tolist(), strict=True) if n == 0]
        raise IncompatibleModelsError(
            f"no training images of classes {missing} to synthesise old-model rows from"
        )
    return sums / counts[:, None]


def class_mean_embeddings(model: EmbeddingModel, batches, classes: list[int], dim: int) -> torch.Tensor:
    """Mean embedding per class, (K, D), over ``batches`` of (inputs (B, C, H, W), labels (B,)).

    Used twice: as synthesised classifier rows for classes the old head never saw, and as the class centres
    the full BCT recipe pulls new embeddings towards. Raises if a class has no example.
    """
    return class_means(*embed_rows(model, batches, classes, dim), classes)


def build_old_head(old: EmbeddingModel, classes: list[int], means: torch.Tensor) -> OldHead:
    """The BCT target head: old rows for old classes, the old model's class mean for every new one.

    ``means`` is (len(classes), D_old) from ``class_mean_embeddings(old, ...)`` over the new training set.
    """
    new_only = [i for i, c in enumerate(classes) if c not in old.classes]
    return OldHead(old.head, old.classes, classes, means[new_only])


NEW_ROWS = ("mean", "probe", "probe-old-head")


def probe_new_rows(
    emb: torch.Tensor,
    rows: torch.Tensor,
    means: torch.Tensor,
    new: torch.Tensor,
    mode: str,
    old_rows: torch.Tensor | None = None,
    old_scale: float = 4.0,
    steps: int = 300,
) -> torch.Tensor:
    """Class targets for BCT with the new classes' rows refined by a linear probe in the old space, (K, D).

    ``emb`` (N, D) are the old model's embeddings of the new training set, ``rows`` (N,) their rows in the new
    class list, ``means`` (K, D) the old model's class means (the starting rows), ``new`` (K,) True for classes
    the old head never saw. A class mean is a poor retrieval direction for a class the old model never learned
    (its images scatter among the old classes), so each new row is moved to the direction that best separates
    the class from the rest in the old space: a cosine-softmax probe fitted on ``emb`` (full batch, Adam).
    ``probe``: every row free, scale 16; ``probe-old-head``: the old head's rows (``old_rows``, (K, D), rows of
    old classes used) frozen, at its own scale, so the new rows fit the head they are appended to.
    Old classes keep their means. Deterministic (fixed initialisation, full batch).
    """
    if mode not in NEW_ROWS[1:]:
        raise ConfigError(f"new-class rows are one of {', '.join(NEW_ROWS)}, got {mode!r}")
    x = F.normalize(emb, dim=1)
    start = F.normalize(means, dim=1)
    frozen = mode == "probe-old-head"
    if frozen:
        assert old_rows is not None
        start = torch.where(new[:, None], start, F.normalize(old_rows, dim=1))
    scale = old_scale if frozen else 16.0
    free = torch.nn.Parameter(start.clone())
    opt = torch.optim.Adam([free], lr=0.01)
    with torch.enable_grad():
        for _ in range(steps):
            w = torch.where(new[:, None], free, start) if frozen else free
            loss = F.cross_entropy(scale * x @ F.normalize(w, dim=1).T, rows)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return torch.where(new[:, None], F.normalize(free.detach(), dim=1), means)


@dataclass(frozen=True)
class BCTWeights:
    """Weights of the BCT terms. ``plain`` BCT is influence alone; the full recipe adds two small L2 pulls."""

    influence: float = 1.0
    to_class_mean: float = 0.0
    to_old_embedding: float = 0.0
    # Which images the two pulls apply to: "all", or "old" (classes the old model was trained on; its
    # embedding and class mean of a class it never saw are no targets worth copying).
    pulls_on: str = "all"
    influence_scale: float | None = None  # logit scale of the influence CE; None = the old head's own
    # Rows (and pull centres) of classes the old head never saw: the old model's class "mean", or refined by
    # a linear probe in the old space (probe_new_rows).
    new_rows: str = "mean"

    def __post_init__(self) -> None:
        if min(self.influence, self.to_class_mean, self.to_old_embedding) < 0:
            raise ConfigError(
                f"BCT weights must be >= 0, got influence {self.influence}, class mean "
                f"{self.to_class_mean}, old embedding {self.to_old_embedding}"
            )
        if self.pulls_on not in ("all", "old"):
            raise ConfigError(
                f"BCT pulls apply to 'all' images or the 'old' classes' only, got {self.pulls_on!r}"
            )
        if self.new_rows not in NEW_ROWS:
            raise ConfigError(f"new-class rows are one of {', '.join(NEW_ROWS)}, got {self.new_rows!r}")
        if self.influence_scale is not None and self.influence_scale <= 0:
            raise ConfigError(f"influence scale must be > 0, got {self.influence_scale}")

    @classmethod
    def recipe(cls, name: str) -> BCTWeights:
        if name == "plain":
            return cls(influence=1.0)
        if name == "full":
            # Measured on Fashion-MNIST, 12 epochs (BENCHMARKS.md, "BCT recipe search"): the pull to the old
            # embedding of the same image lifts top-1 over old/old. With class-mean rows and centres the update
            # gain stayed under 0.5 on two seeds of three: a new class's old-model mean ranks v1's gallery
            # badly (its images scatter among old classes). Probe-refined rows for new classes, pulled towards
            # at weight 4 (old classes: towards their mean), lift both top-1 and the gain.
            return cls(influence=1.0, to_class_mean=4.0, to_old_embedding=1.0, new_rows="probe")
        raise ValueError(f"unknown BCT recipe {name!r}: 'full' or 'plain'")


def bct_losses(
    new_emb: torch.Tensor,
    labels_rows: torch.Tensor,
    old_head: OldHead,
    weights: BCTWeights,
    class_means: torch.Tensor | None = None,
    old_emb: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """BCT terms for (B, D) new embeddings and (B,) rows of the new class list.

    influence: CE of the new embedding under the frozen (extended) old head.
    to_class_mean: squared distance to the normalised class centre (K, D) of the label: the old model's class
    mean, or for a new class its probe-refined row when ``weights.new_rows`` says so (the caller's targets).
    to_old_embedding: squared distance to the old model's (B, D) embedding of the same image.
    """
    if new_emb.shape[1] != old_head.synthesized.shape[1] and new_emb.shape[1] != old_head.old.weight.shape[1]:
        raise IncompatibleModelsError(
            f"new embedding dim {new_emb.shape[1]} != old {old_head.old.weight.shape[1]}"
        )
    logits = old_head(new_emb)
    if weights.influence_scale is not None:
        logits = logits * (weights.influence_scale / old_head.scale)
    terms = {"influence": weights.influence * F.cross_entropy(logits, labels_rows)}
    keep = torch.ones_like(labels_rows, dtype=new_emb.dtype)  # (B,) 1 where the pulls apply
    if weights.pulls_on == "old":
        keep = (old_head.old_index[labels_rows] >= 0).to(new_emb.dtype)
    if weights.to_class_mean:
        assert class_means is not None
        centre = F.normalize(class_means, dim=1)[labels_rows]  # (B, D)
        terms["to_class_mean"] = weights.to_class_mean * (keep * (new_emb - centre).pow(2).sum(1)).mean()
    if weights.to_old_embedding:
        assert old_emb is not None
        terms["to_old_embedding"] = (
            weights.to_old_embedding * (keep * (new_emb - old_emb).pow(2).sum(1)).mean()
        )
    return terms


# ---------------------------------------------------------------------------------------------------------
# Positive-congruent training (Yan et al., CVPR 2021): focal distillation towards the old model.
#
# The distillation runs over the classes *both* models know (the old model's classes present in the new
# model's head), softmax renormalised over them on both sides. We do not use the BCT OldHead's synthesised
# rows for classes the old model never saw: those rows are class means, not a trained classifier, so the
# old "prediction" over them is no knowledge worth preserving, and a negative flip can only happen on a class
# the old model knows. A sample of a class the old model does not know is never "old-correct": it gets the
# base weight alpha (alpha = 0 switches distillation off there).

PC_KINDS = ("kd", "fd-kl", "fd-lm")


@dataclass(frozen=True)
class FocalDistillation:
    """Settings of the PC loss. ``kind``: ``kd`` (KL, weight 1 everywhere), ``fd-kl`` or ``fd-lm``.

    Per-sample weight w = alpha + beta * 1[old model right]; the loss is ``weight * mean_b(w_b * d_b)`` with
    d the KL divergence at ``temperature`` (times T^2, the usual distillation scaling) or half the squared L2
    distance between the logits. The KL kinds default to T = 4, which with cosine-head logits (``scale * cos``)
    is close to Hinton's high-temperature limit, T^2 KL ~ ||centred logit difference||^2 / (2K) for K
    classes: the whole logit vector is transferred, not only the old model's top class. fd-lm's squared
    distance is then ~K times larger, hence its smaller default weight (0.05, the same order as 1/K).
    """

    kind: str = "fd-kl"
    alpha: float = 1.0
    beta: float = 5.0
    temperature: float = 4.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in PC_KINDS:
            raise ConfigError(f"unknown PC loss {self.kind!r}: choose one of {', '.join(PC_KINDS)}")
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta <= 0:
            raise ConfigError(
                f"focal weights need alpha, beta >= 0 and alpha + beta > 0, got {self.alpha}, {self.beta}"
            )
        if self.temperature <= 0 or self.weight <= 0:
            raise ConfigError(f"PC temperature and weight must be > 0, got {self.temperature}, {self.weight}")

    @classmethod
    def preset(cls, kind: str, **overrides: float | None) -> FocalDistillation:
        """``kd`` is plain distillation (alpha 1, beta 0); the focal kinds default to alpha 1, beta 5; fd-lm's
        term weight defaults to 0.05 (see the class docstring)."""
        base = {"kd": cls(kind=kind, alpha=1.0, beta=0.0), "fd-lm": cls(kind=kind, weight=0.05)}.get(
            kind, cls(kind=kind)
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def term(self) -> str:
        return self.kind.replace("-", "_")  # the loss term's name in logs: kd, fd_kl, fd_lm


def shared_class_rows(old_classes: list[int], new_classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) old head rows and (S,) new head rows of the S classes both heads know, in the old head's order."""
    new_row = {c: i for i, c in enumerate(new_classes)}
    shared = [(i, new_row[c]) for i, c in enumerate(old_classes) if c in new_row]
    if not shared:
        raise IncompatibleModelsError(
            f"the old model's classes {old_classes} and the new model's {new_classes} "
            "have none in common: nothing to distil"
        )
    old_idx, new_idx = zip(*shared, strict=True)
    return torch.tensor(old_idx), torch.tensor(new_idx)


def focal_weights(
    old_logits: torch.Tensor, old_rows: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """(B,) weights alpha + beta * 1[old argmax == label] from (B, K_old) old logits and (B,) old-head rows of
    the labels (-1 for labels the old head does not know, which are never right)."""
    correct = (old_logits.argmax(1) == old_rows) & (old_rows >= 0)  # (B,) bool
    return alpha + beta * correct.to(old_logits.dtype)


def focal_distillation(
    new_logits: torch.Tensor,
    old_logits: torch.Tensor,
    old_rows: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor],
    cfg: FocalDistillation,
) -> dict[str, torch.Tensor]:
    """The PC term for (B, K_new) new logits and (B, K_old) frozen old logits of the same images.

    ``old_rows`` (B,) are the labels' rows in the old head (-1 if unknown to it); ``shared`` comes from
    ``shared_class_rows``. Returns ``{cfg.term: loss}``.
    """
    old_idx, new_idx = shared
    old_s = old_logits.detach()[:, old_idx]  # (B, S): the old model is a fixed target
    new_s = new_logits[:, new_idx]  # (B, S)
    w = focal_weights(old_logits.detach(), old_rows, cfg.alpha, cfg.beta)  # (B,)
    if cfg.kind == "fd-lm":
        d = 0.5 * (new_s - old_s).pow(2).sum(1)  # (B,)
    else:
        t = cfg.temperature
        log_p_new = F.log_softmax(new_s / t, dim=1)  # (B, S)
        log_p_old = F.log_softmax(old_s / t, dim=1)  # (B, S)
        d = (log_p_old.exp() * (log_p_old - log_p_new)).sum(1) * t * t  # (B,) KL(p_old || p_new)
    return {cfg.term: cfg.weight * (w * d).mean()}
