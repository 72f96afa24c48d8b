"""LQF: linearised fine-tuning of an old model on new data (Achille et al., CVPR 2021, "LQF: Linear
Quadratic Fine-Tuning").

The old network is replaced by its first-order Taylor expansion around the old weights ``w0``::

    f_lin(x; w) = f(x; w0) + J_w f(x; w0) (w - w0)

computed with ``torch.func.jvp`` over ``torch.func.functional_call``. The model is linear in ``w``, so a
least-squares loss on its logits is a convex quadratic: fine-tuning is a linear regression in the Jacobian's
features, preconditioned with K-FAC. Choices made here (the card records them, ``train_config.lqf_settings``):

- **What is linearised**: the whole network, every parameter: convolutions, BatchNorm affine parameters, the
  projection and the head. BatchNorm runs in eval mode with the old model's running statistics throughout,
  so the network is a pure function of its weights (its statistics are not re-estimated on the new data).
- **The head**: the cosine head ``scale * <e, W_k / |W_k|>`` is not linear in ``W`` and its Jacobian is
  undefined at a zero row, so the linearised network uses it in its row-normalised form, a linear layer
  ``scale * <e, V_k>`` with ``V0_k = W0_k / |W0_k|`` (the same logits at ``w0``). Rows of classes the old
  head never had start at zero: at ``w0`` the old rows' logits are exactly the old model's, the new rows' 0.
- **Activation**: leaky ReLU (the paper's choice: a ReLU network's Jacobian is zero wherever a unit is off).
  The linearised network keeps the old model's slope (``ArchConfig.negative_slope``; pretrain v1 with
  ``--negative-slope`` to follow the paper), so that ``f_lin(x; w0)`` is the old model exactly; an LQF run's
  ``--negative-slope`` swaps the slope of the old weights' network instead. On Fashion-MNIST v1 (the demo's,
  ReLU) a swap to 0.1 alone cost 0.5 points of accuracy and changed 2.6% of its predictions, before any
  training: the default does not swap.
- **Loss**: ``0.5 * |f_lin(x; w) - target * onehot(y)|^2`` summed over the classes, averaged over the batch;
  ``target`` defaults to the head's scale (the largest logit a cosine head can give).
- **Optimiser**: K-FAC for every Linear and Conv2d layer (convolutions as in KFC, Grosse & Martens 2016: the
  input factor over unfolded patches): ``A = E[a a^T]`` of the layer's inputs at ``w0`` (a constant 1
  appended for a bias), ``G = E[g g^T]`` of the gradients at its outputs, for output noise drawn from the
  least-squares likelihood (the Fisher, which for this loss is the Gauss-Newton matrix), running averages,
  damped inverses ``(A + d mean_eig(A) I)^-1``, update ``G^-1 grad A^-1``; BatchNorm's affine parameters
  take the plain gradient. Step size and momentum are K-FAC's: the batch's exact quadratic optimum along
  the direction and the previous step (``lqf_step``), times ``--lr`` (a fraction: 1 is that optimum), on a
  cosine schedule; weight decay on ``w - w0`` (towards the old model, where the linearisation holds). For a
  linearised network ``A`` and ``G`` depend on the data only, never on ``w``, so they are refreshed every
  ``stat_every`` steps, not every step.
- **Damping** defaults to 1 (each factor plus its mean eigenvalue): lightly damped K-FAC fits the linear
  model as well but walks far from ``w0`` (on a 3,000-image Fashion-MNIST slice, 100 steps: damping 0.01
  gave |w - w0| 27 and a nonlinear network at ``w`` near chance, damping 1 gave |w - w0| 2).

The result is saved as an ordinary model folder of the old architecture with the weights ``w`` (the head's
rows ``V``). A folder is always served as the *nonlinear* network at ``w``: ``f(x; w)``, which differs from
``f_lin(x; w)`` by second-order terms (and the cosine head renormalises the rows ``V``). ``LinearisedModel``
evaluates the *linear* model ``f_lin`` (``load_linearised`` rebuilds it from an LQF folder and its old
model's), and the card's ``metrics.lqf`` compares the two (``evaluate_linearised``). The head is where they
part most: a new class's row grows from zero and stays short while the linear model underfits, and the
cosine head gives it full length (on a short run the nonlinear model lost old-class answers to new classes
that the linear model kept).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import ConfigError, IncompatibleModelsError, ModelCardError
from trainer.model import ArchConfig, Backbone, EmbeddingModel

if TYPE_CHECKING:
    from trainer.artifact import LoadedModel
    from trainer.data import Split
    from trainer.preprocess import Preprocess

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LQFSettings:
    """How an LQF run linearises and trains (the card's ``train_config.lqf_settings``)."""

    negative_slope: float  # of the linearised network's leaky ReLUs (0: ReLU)
    target: float  # least-squares targets: target * onehot(label)
    damping: float = 1.0  # K-FAC: each factor damped by this fraction of its mean eigenvalue
    stat_every: int = 10  # steps between K-FAC statistics updates (and inverse refreshes)
    stat_decay: float = 0.9  # running average of the K-FAC factors
    weight_decay: float = 5e-4  # on w - w0
    # Each step lr * (alpha d + mu previous step), (alpha, mu) the batch's exact quadratic optimum (lqf_step).
    step_size: str = "quadratic-optimum"
    linearised: str = "all"  # every parameter of the network (BatchNorm in eval mode, old statistics)
    preconditioner: str = "kfac"  # K-FAC on Linear/Conv2d, plain gradient on the rest (BatchNorm affine)
    loss: str = "mse"

    def __post_init__(self) -> None:
        if not 0.0 <= self.negative_slope < 1.0:
            raise ConfigError(f"--negative-slope must be in [0, 1), got {self.negative_slope}")
        if self.target <= 0 or self.damping <= 0 or self.stat_every < 1:
            raise ConfigError("LQF target and damping must be > 0, stat_every >= 1")
        if not (0.0 <= self.stat_decay < 1.0 and self.weight_decay >= 0):
            raise ConfigError("LQF stat_decay must be in [0, 1), weight_decay >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the linearised network ---------------------------------------------------------------------------------


class LinearisableNet(nn.Module):
    """The old network in the form LQF linearises: its backbone, and its cosine head as a linear layer on the
    unit embedding (``logits = scale * e @ V.T``, rows ``V = W / |W|``; see the module docstring).

    (B, C, H, W) normalised floats -> ((B, D) unit-norm embeddings, (B, K) logits). Always in eval mode."""

    def __init__(self, backbone: nn.Module, rows: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(rows.shape[1], rows.shape[0], bias=False, dtype=rows.dtype)
        with torch.no_grad():
            self.head.weight.copy_(rows)
        self.scale = scale
        self.eval()

    def train(self, mode: bool = True) -> LinearisableNet:
        # BatchNorm keeps the old running statistics: the network must be a pure function of its weights.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.backbone(x)  # (B, D), unit norm (Backbone normalises)
        return emb, self.scale * self.head(emb)  # (B, D), (B, K)


def linearisation_point(
    old: EmbeddingModel, classes: list[int], negative_slope: float | None = None
) -> LinearisableNet:
    """``w0``: a copy of the old network as a ``LinearisableNet`` over ``classes`` (rows in that order).

    Rows of classes the old head knows are its rows normalised; rows of new classes are zero. A
    ``negative_slope`` other than the old model's rebuilds the backbone with that slope (the old weights)."""
    if not isinstance(old.backbone, Backbone):
        raise IncompatibleModelsError(
            f"LQF linearises the preset networks; the old model is {old.cfg.name} (a library backbone)"
        )
    slope = old.cfg.negative_slope if negative_slope is None else negative_slope
    backbone = Backbone(replace(old.cfg, negative_slope=slope))
    backbone.load_state_dict(old.backbone.state_dict())
    old_row = {c: i for i, c in enumerate(old.classes)}
    w = old.head.weight.detach()
    backbone.to(w.dtype)
    rows = torch.zeros(len(classes), w.shape[1], dtype=w.dtype)
    for i, c in enumerate(classes):
        if c in old_row:
            rows[i] = F.normalize(w[old_row[c]], dim=0)
    return LinearisableNet(backbone, rows, old.head.scale)


def linear_outputs(
    net: nn.Module, params0: Params, delta: Params, x: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The network's outputs at ``w0`` and their first-order change: ``(f(x; w0), J_w f(x; w0) delta)``,
    each a tuple ((B, D) embeddings, (B, K) logits), from one ``torch.func.jvp`` over ``functional_call``.

    ``f_lin(x; w0 + delta)`` is their sum. ``params0``/``delta``: parameter name -> tensor, every parameter
    of ``net`` (buffers, BatchNorm's statistics, are the module's own)."""

    def f(p: Params) -> tuple[torch.Tensor, ...]:
        return tuple(torch.func.functional_call(net, p, (x,)))

    out0, tangent = torch.func.jvp(f, (params0,), (delta,))
    return out0, tangent


class LinearisedModel(nn.Module):
    """The linear model ``f_lin(x; w0 + delta)`` around a ``LinearisableNet`` (its parameters are ``w0``).

    ``outputs(x)``: (B, C, H, W) -> ((B, D) linearised embeddings, not normalised; (B, K) logits).
    ``embed(x)``: the linearised embeddings L2-normalised (B, D), for retrieval. ``nonlinear()``: the
    ordinary model at ``w = w0 + delta`` (what is saved and served: the *nonlinear* network at ``w``)."""

    def __init__(self, net: LinearisableNet, classes: list[int], cfg: ArchConfig) -> None:
        super().__init__()
        self.net = net
        self.classes = list(classes)
        self.cfg = replace(cfg, num_classes=len(classes))
        self.delta: Params = {k: torch.zeros_like(p) for k, p in net.named_parameters()}

    def params0(self) -> Params:
        return {k: p.detach() for k, p in self.net.named_parameters()}

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            (e0, l0), (de, dl) = linear_outputs(self.net, self.params0(), self.delta, x)
        return e0 + de, l0 + dl

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.outputs(x)[0], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.outputs(x)

    def weights(self) -> Params:
        """``w = w0 + delta``, by the net's parameter names."""
        return {k: p + self.delta[k] for k, p in self.params0().items()}

    def nonlinear(self) -> EmbeddingModel:
        """The ordinary (nonlinear) model at ``w``: backbone weights ``w``, head rows ``V`` (renormalised by the
        cosine head at every forward), BatchNorm statistics the old model's. Eval mode, no gradients."""
        model = EmbeddingModel(self.cfg, self.classes)
        w = self.weights()
        state = {k: v for k, v in self.net.state_dict().items() if k.startswith("backbone.")}
        state.update({k: v for k, v in w.items() if k.startswith("backbone.")})
        state["head.weight"] = w["head.weight"]
        model.load_state_dict(state, strict=True)
        return model.eval().requires_grad_(False)


# --- K-FAC --------------------------------------------------------------------------------------------------


def damped_inverse(m: torch.Tensor, damping: float) -> torch.Tensor:
    """``(m + damping * mean_eig(m) I)^-1`` of a symmetric PSD (n, n) matrix (the damping is relative, so it
    means the same at any scale of the statistics)."""
    n = m.shape[0]
    eye = torch.eye(n, dtype=m.dtype, device=m.device)
    lam = damping * max(float(torch.trace(m)) / n, 1e-12)
    return torch.cholesky_inverse(torch.linalg.cholesky(m + lam * eye))


def kron_precondition(grad: torch.Tensor, a_inv: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """``G^-1 grad A^-1`` for a (out, in) gradient matrix: (G ⊗ A)^-1 vec(grad) for row-major vec, without
    forming the Kronecker product."""
    return g_inv @ grad @ a_inv


def _patches(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) conv inputs -> (B * T, C * kh * kw) patches, one row per output location (im2col), in
    the order of the weight's (out, C, kh, kw) flattening."""
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (B, C*kh*kw, T)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _kfac_layer(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.groups == 1 and isinstance(m.padding, tuple)


class KFAC:
    """Kronecker factors of every Linear and (ungrouped) Conv2d layer of ``net`` and the preconditioned
    update. ``record()`` captures each layer's inputs and outputs during a forward; ``update(grads)`` folds
    one batch into the running factors from the gradients at the captured outputs; ``precondition(grads)``
    maps parameter gradients (by name) to update directions: K-FAC for those layers, the gradient as is for
    every other parameter.

    Per layer (B samples, T output locations; T = 1 for a Linear): ``A = sum_t a a^T / (B T)`` over the
    inputs (im2col patches for a conv, a constant 1 appended for a bias), ``G = sum_t g g^T / B`` over the
    output gradients of per-sample losses (KFC's convention: A averaged over locations, G summed)."""

    def __init__(self, net: nn.Module, damping: float = 0.1, decay: float = 0.9) -> None:
        self.damping, self.decay = damping, decay
        self.layers: dict[str, nn.Module] = {n: m for n, m in net.named_modules() if _kfac_layer(m)}
        self.a: dict[str, torch.Tensor] = {}
        self.g: dict[str, torch.Tensor] = {}
        self.inv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        """Capture each K-FAC layer's input (detached) and output (in the graph) of the forwards inside."""

        def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
            def save(_: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
                self.inputs[name], self.outputs[name] = inp[0].detach(), out

            return save

        handles = [m.register_forward_hook(hook(n)) for n, m in self.layers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _a_rows(self, name: str) -> tuple[torch.Tensor, int]:
        """The layer's input rows (N, in [+1]) and the batch size B."""
        m, x = self.layers[name], self.inputs[name]
        rows = _patches(m, x) if isinstance(m, nn.Conv2d) else x.reshape(-1, x.shape[-1])
        if getattr(m, "bias", None) is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows, x.shape[0]

    def update(self, out_grads: dict[str, torch.Tensor]) -> None:
        """Fold one batch into the factors: ``out_grads[name]`` is d(sum of per-sample losses)/d(output) of
        each layer, shaped as its captured output; then refresh the damped inverses."""
        for name, m in self.layers.items():
            if name not in out_grads:
                continue
            rows, b = self._a_rows(name)
            a = rows.T @ rows / rows.shape[0]
            g = out_grads[name]
            g = g.transpose(1, -1).reshape(-1, g.shape[1]) if isinstance(m, nn.Conv2d) else g
            g = g.reshape(-1, g.shape[-1])
            gg = g.T @ g / b
            if name in self.a:
                self.a[name] = self.decay * self.a[name] + (1 - self.decay) * a
                self.g[name] = self.decay * self.g[name] + (1 - self.decay) * gg
            else:
                self.a[name], self.g[name] = a, gg
            self.inv[name] = (
                damped_inverse(self.a[name], self.damping),
                damped_inverse(self.g[name], self.damping),
            )
        self.inputs.clear()
        self.outputs.clear()

    def precondition(self, grads: Params) -> Params:
        """Update directions for ``grads`` (parameter name -> gradient): ``G^-1 [dW | db] A^-1`` for a K-FAC
        layer with factors, the gradient itself for any other parameter."""
        out = dict(grads)
        for name, m in self.layers.items():
            if name not in self.inv:
                continue
            wkey, bkey = f"{name}.weight" if name else "weight", f"{name}.bias" if name else "bias"
            gw = grads[wkey]
            mat = gw.reshape(gw.shape[0], -1)
            has_bias = getattr(m, "bias", None) is not None
            if has_bias:
                mat = torch.cat([mat, grads[bkey][:, None]], dim=1)
            a_inv, g_inv = self.inv[name]
            p = kron_precondition(mat, a_inv, g_inv)
            if has_bias:
                out[bkey] = p[:, -1]
                p = p[:, :-1]
            out[wkey] = p.reshape(gw.shape)
        return out


# --- training -----------------------------------------------------------------------------------------------


def lqf_loss(logits: torch.Tensor, rows: torch.Tensor, target: float) -> torch.Tensor:
    """``0.5 * |logits - target * onehot(rows)|^2`` summed over the K classes, mean over the batch: (B, K),
    (B,) -> scalar."""
    y = F.one_hot(rows, logits.shape[1]).to(logits.dtype) * target
    return 0.5 * (logits - y).pow(2).sum(1).mean()


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def lqf_step(
    lin: LinearisedModel,
    kfac: KFAC,
    x: torch.Tensor,
    rows: torch.Tensor,
    settings: LQFSettings,
    lr: float,
    prev: Params,
    stats: bool,
    gen: torch.Generator | None = None,
) -> float:
    """One K-FAC step on the linear model's objective for a batch ((B, C, H, W), (B,) head rows): updates
    ``lin.delta`` and ``prev`` (the last update) in place; returns the least-squares loss before the step.

    The objective ``lqf_loss + weight_decay/2 |delta|^2`` is a quadratic in ``delta``. Its gradient is
    ``J(w0)^T r + weight_decay delta``, ``r`` the loss's gradient at the logits: one backward pass of the
    network at ``w0`` (whose layer inputs are K-FAC's ``a``). With ``stats``, a second backward of output
    noise ``eps ~ N(0, I)`` (the least-squares likelihood's: its Fisher is ``J^T J``) gives K-FAC's ``g``.
    The update is ``lr * (alpha d + mu prev)``, ``d`` the K-FAC direction, with ``(alpha, mu)`` minimising
    the batch's exact quadratic (two more jvps): K-FAC's own step size and momentum (Martens & Grosse
    2015, section 7), exact here because the model is linear. A block-diagonal preconditioner's raw step
    overshoots (each layer's block fits the residual on its own); this rescaling is what keeps it stable."""
    net = lin.net
    p0 = lin.params0()
    with torch.no_grad():  # forward-mode only: no graph of the jvp
        (_, l0), (_, dl) = linear_outputs(net, p0, lin.delta, x)
    logits = (l0 + dl).detach()  # (B, K)
    logits.requires_grad_(True)
    loss = lqf_loss(logits, rows, settings.target)
    (r,) = torch.autograd.grad(loss, logits)  # (B, K)
    names = [k for k, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    with torch.enable_grad(), kfac.record() if stats else contextlib.nullcontext():
        for p in params:
            p.requires_grad_(True)
        _, out = net(x)
        grads = torch.autograd.grad(out, params, r, retain_graph=stats and bool(kfac.outputs))
        if stats and kfac.outputs:
            eps = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
            g = torch.autograd.grad(out, list(kfac.outputs.values()), eps)
            kfac.update(dict(zip(kfac.outputs, g, strict=True)))
    wd = settings.weight_decay
    with torch.no_grad():
        grad = {k: gk + wd * lin.delta[k] for k, gk in zip(names, grads, strict=True)}
        pre = kfac.precondition(dict(zip(names, grads, strict=True)))
        d = {k: -(pre[k] + wd * lin.delta[k]) for k in names}
        dirs = [d, prev] if prev else [d]
        jv = [linear_outputs(net, p0, t, x)[1][1] for t in dirs]  # (B, K) each: J t on the logits
        n = len(dirs)
        c = torch.zeros(n, n, dtype=torch.float64)
        b = torch.zeros(n, dtype=torch.float64)
        for i in range(n):
            b[i] = float(_dot(grad, dirs[i]))
            for j in range(i, n):
                c[i, j] = c[j, i] = float((jv[i] * jv[j]).sum() / x.shape[0] + wd * _dot(dirs[i], dirs[j]))
        c += torch.eye(n, dtype=torch.float64) * 1e-10 * float(c.diagonal().max().clamp_min(1e-30))
        coef = (
            torch.linalg.solve(c, -b) if bool(c.diagonal().min() > 0) else torch.zeros(n, dtype=torch.float64)
        )
        if n == 2 and not bool(torch.isfinite(coef).all()):  # degenerate pair: the direction alone
            coef = torch.stack([-b[0] / c[0, 0], torch.zeros((), dtype=torch.float64)])
        step = {k: lr * sum(float(coef[i]) * dirs[i][k] for i in range(n)) for k in names}
        for k in names:
            lin.delta[k] = lin.delta[k] + step[k]
        prev.clear()
        prev.update(step)
    return float(loss.detach())


def check_old(old: LoadedModel) -> None:
    """Refuse an old model LQF cannot linearise, before any data is read: an ONNX model, a library
    backbone."""
    if not isinstance(old.model, EmbeddingModel):
        raise IncompatibleModelsError(
            f"--lqf needs a graceful torch model as --old; {old.version} is {old.card.format}"
        )
    if not isinstance(old.model.backbone, Backbone):
        raise IncompatibleModelsError(
            f"--lqf linearises the preset networks; {old.version} is {old.model.cfg.name} (a library backbone)"
        )


def check_same_arch(old: LoadedModel, model: EmbeddingModel, prep: Preprocess) -> None:
    """The model the flags describe must be the old network (classes and slope aside), under its contract."""
    src = old.model
    assert isinstance(src, EmbeddingModel)
    skip = {"num_classes": 0, "negative_slope": 0}
    if src.cfg.to_dict() | skip != model.cfg.to_dict() | skip:
        raise IncompatibleModelsError(
            f"--lqf fine-tunes the old network itself, so it needs its architecture: {old.version} is "
            f"{src.cfg.to_dict()}, the flags give {model.cfg.to_dict()} (classes and slope aside; pass "
            "--arch/--width/--depth/--embedding-dim/--scale as the old model's)"
        )
    if old.preprocess.to_dict() != prep.to_dict():
        raise IncompatibleModelsError(
            f"--lqf needs the old model's input contract: {old.version} takes {old.preprocess.to_dict()}, "
            f"the new model {prep.to_dict()}"
        )


@dataclass
class LQFFit:
    """What ``fit_lqf`` returns: the trained linear model and its per-epoch mean loss."""

    lin: LinearisedModel
    history: list[dict[str, float]]
    seconds: float


def fit_lqf(
    old: LoadedModel,
    classes: list[int],
    settings: LQFSettings,
    epoch_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int,
    steps_per_epoch: int,
    lr: float,
    seed: int,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> LQFFit:
    """Fine-tune ``old`` linearly, K-FAC preconditioned: ``epoch_batches()`` yields one epoch of (images
    (B, C, H, W) float under the old model's contract, head rows (B,) in ``classes`` order).

    ``lr`` is a fraction of each step's quadratic optimum, on a cosine schedule (no warm-up: the step size is
    right from step 0). The training loop around it (data, card, metrics) is trainer.train's."""
    assert isinstance(old.model, EmbeddingModel)
    arch = replace(old.model.cfg, num_classes=len(classes), negative_slope=settings.negative_slope)
    lin = LinearisedModel(linearisation_point(old.model, classes, settings.negative_slope), classes, arch)
    kfac = KFAC(lin.net, settings.damping, settings.stat_decay)
    new_rows = [c for c in classes if c not in old.model.classes]
    if settings.negative_slope != old.model.cfg.negative_slope:
        log.warning(
            "LQF swaps %s's activation slope %g for %g: f_lin at w0 is no longer the old model exactly",
            old.version,
            old.model.cfg.negative_slope,
            settings.negative_slope,
        )
    log.info(
        "LQF from %s: %d new head rows (%s), settings %s", old.version, len(new_rows), new_rows, settings
    )
    total = steps_per_epoch * epochs
    prev: Params = {}
    noise = torch.Generator().manual_seed(seed + 104729)  # K-FAC's output noise, its own stream
    history: list[dict[str, float]] = []
    step, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        total_loss = 0.0
        for x, rows in epoch_batches():
            step_lr = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = lqf_step(
                lin, kfac, x, rows, settings, step_lr, prev, stats=step % settings.stat_every == 0, gen=noise
            )
            if not math.isfinite(loss):
                raise ConfigError(f"LQF diverged at step {step} (loss {loss}): lower --lr")
            total_loss += loss
            step += 1
            if progress:
                progress(step, total, {"lqf_mse": loss})
        history.append({"epoch": epoch + 1, "lqf_mse": total_loss / steps_per_epoch})
        log.info("epoch %d/%d %s", epoch + 1, epochs, history[-1])
    return LQFFit(lin=lin, history=history, seconds=time.perf_counter() - t0)


# --- the linear model, evaluated ----------------------------------------------------------------------------


def load_linearised(folder: str | Path, old_folder: str | Path | None = None) -> LinearisedModel:
    """The linear model ``f_lin`` of an LQF model folder: linearised around its old model's weights (the
    card's ``train_config.old``, or ``old_folder``), at the folder's weights ``w``."""
    from trainer.artifact import load_model

    new = load_model(folder)
    tc = new.card.train_config
    if not tc.get("lqf") or not isinstance(tc.get("lqf_settings"), dict):
        raise ModelCardError(f"{new.version} was not trained with --lqf")
    old = load_model(old_folder or tc["old"])
    if not isinstance(old.model, EmbeddingModel) or not isinstance(new.model, EmbeddingModel):
        raise IncompatibleModelsError("an LQF model and its old model are graceful torch models")
    settings = LQFSettings(**tc["lqf_settings"])
    lin = LinearisedModel(
        linearisation_point(old.model, new.model.classes, settings.negative_slope),
        new.model.classes,
        new.model.cfg,
    )
    state = new.model.state_dict()
    w0 = lin.params0()
    try:
        lin.delta = {k: state[k] - w0[k] for k in w0}
    except (KeyError, RuntimeError) as e:
        raise IncompatibleModelsError(
            f"{new.version}'s weights do not fit {old.version}'s network: {e}"
        ) from None
    return lin


def evaluate_linearised(
    lin: LinearisedModel, old: LoadedModel, test: Split, every: int = 5, workers: int | None = None
) -> dict[str, Any]:
    """The linear model ``f_lin(x; w)`` beside the nonlinear ``f(x; w)`` (the saved model) on ``test``:
    classification error and negative flips against ``old`` (over the test images of classes the LQF model
    knows), and retrieval (queries = index % ``every`` == 0) of each against itself and against the old
    model's gallery."""
    from trainer.data import iter_views, query_gallery_split
    from trainer.metrics import negative_flips, retrieval_metrics

    nonlin = lin.nonlinear()
    prep = old.preprocess
    embs: dict[str, list[np.ndarray]] = {"linear": [], "nonlinear": [], "old": []}
    logits: dict[str, list[np.ndarray]] = {"linear": [], "nonlinear": [], "old": []}
    with torch.no_grad():
        for (x8,), _ in iter_views(test, [prep], 256, None, workers):
            x = prep(x8)
            el, ll = lin.outputs(x)
            for key, (e, lg) in {
                "linear": (F.normalize(el, dim=1), ll),
                "nonlinear": nonlin(x),
                "old": old.model(x),  # type: ignore[operator]
            }.items():
                embs[key].append(e.numpy())
                logits[key].append(lg.numpy())
    e = {k: np.concatenate(v) for k, v in embs.items()}
    labels = np.asarray(test.labels)
    q, g = query_gallery_split(len(labels), every)
    out: dict[str, Any] = {}
    known = np.isin(labels, lin.classes)
    old_classes = np.asarray(old.card.classes)
    old_pred = old_classes[np.concatenate(logits["old"]).argmax(1)]
    for key in ("linear", "nonlinear"):
        pred = np.asarray(lin.classes)[np.concatenate(logits[key]).argmax(1)]
        flips = negative_flips(old_pred[known], pred[known], labels[known])
        out[key] = {
            "error": float((pred[known] != labels[known]).mean()) if known.any() else 0.0,
            "flips": {k: v for k, v in flips.items() if not k.startswith("flipped")},
            "self": retrieval_metrics(e[key][q], labels[q], e[key][g], labels[g]),
            "vs_old_gallery": retrieval_metrics(e[key][q], labels[q], e["old"][g], labels[g]),
        }
    out["old_self"] = retrieval_metrics(e["old"][q], labels[q], e["old"][g], labels[g])
    return out
