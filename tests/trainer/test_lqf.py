"""LQF (trainer.lqf): the linearised forward against the exact Taylor expansion, the linear model at the old
weights, the K-FAC factors and preconditioner against explicit products, a tiny end-to-end run, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.console.cli import main
from trainer.errors import ConfigError
from trainer.lqf import (
    KFAC,
    LinearisedModel,
    damped_inverse,
    linear_outputs,
    linearisation_point,
    load_linearised,
    lqf_loss,
)
from trainer.model import EmbeddingModel, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/trainer/conftest.py

FAST = ["--batch-size", "64", "--quiet", "--threads", "1", "--eval-limit", "100"]


def _old_model(classes: list[int], slope: float = 0.1, dtype: torch.dtype = torch.float32) -> EmbeddingModel:
    """A tiny preset network with non-trivial BatchNorm statistics and head (eval mode, as a loaded model)."""
    torch.manual_seed(0)
    model = build_model("small", classes, width=4, embedding_dim=8, negative_slope=slope)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        model.head.weight.normal_()
    return model.to(dtype).eval().requires_grad_(False)


def test_linearised_forward_is_the_exact_first_order_taylor_expansion():
    old = _old_model([0, 1, 2], dtype=torch.float64)
    lin = LinearisedModel(linearisation_point(old, [0, 1, 2]), [0, 1, 2], old.cfg)
    net, p0 = lin.net, lin.params0()
    names = list(p0)
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    d = {k: 0.1 * torch.randn(v.shape, dtype=v.dtype, generator=gen) for k, v in p0.items()}

    # J d computed independently: reverse-over-reverse (torch.autograd.functional.jvp), not torch.func.
    def logits(*ws: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(net, dict(zip(names, ws, strict=True)), (x,))[1]

    f0, jd = torch.autograd.functional.jvp(logits, tuple(p0.values()), tuple(d[k] for k in names))
    (_, l0), (_, tangent) = linear_outputs(net, p0, d, x)
    torch.testing.assert_close(l0, f0)
    torch.testing.assert_close(tangent, jd)

    gaps = []
    for eps in (1e-1, 1e-2):
        lin.delta = {k: eps * v for k, v in d.items()}
        f_lin = lin.outputs(x)[1]
        torch.testing.assert_close(f_lin, f0 + eps * jd)  # f_lin(w0 + eps d) = f(w0) + eps J d
        with torch.no_grad():  # the network itself at w0 + eps d
            f_w = torch.func.functional_call(net, lin.weights(), (x,))[1]
        gaps.append(float((f_lin - f_w).abs().mean()))
    # The gap to the network shrinks faster than the step: a unit whose leaky ReLU kink the step crosses is off
    # by O(eps), and O(eps) of them do, so the mean gap is O(eps^2) in expectation, noisily (the smooth network
    # below shows the clean ratio).
    assert gaps[1] > 0 and gaps[0] / gaps[1] > 20, gaps


class _Smooth(nn.Module):
    """A tiny smooth network with the LinearisableNet contract: conv, BatchNorm (eval), tanh, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.tanh(self.bn(self.conv(x))).mean(dim=(2, 3))
        return emb, self.fc(emb)


def test_linearised_gap_is_second_order_on_a_smooth_network():
    torch.manual_seed(6)
    net = _Smooth().double().eval()
    p0 = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64)
    d = {k: torch.randn_like(v) for k, v in p0.items()}
    gaps = []
    for eps in (1e-2, 1e-3):
        step = {k: eps * v for k, v in d.items()}
        (_, l0), (_, dl) = linear_outputs(net, p0, step, x)
        with torch.no_grad():
            f_w = torch.func.functional_call(net, {k: p0[k] + step[k] for k in p0}, (x,))[1]
        gaps.append(float((l0 + dl - f_w).abs().max()))
    assert 70 < gaps[0] / gaps[1] < 130, gaps  # 10x shorter step, ~100x smaller gap


def test_at_the_old_weights_the_linear_model_is_the_old_model():
    old = _old_model([0, 1, 2])
    classes = [4, 0, 2, 1, 3]  # a new order, two classes the old head never had
    lin = LinearisedModel(linearisation_point(old, classes), classes, old.cfg)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    emb_old, logits_old = old(x)
    emb, logits = lin.outputs(x)
    torch.testing.assert_close(emb, emb_old)
    torch.testing.assert_close(logits[:, [1, 3, 2]], logits_old, atol=1e-5, rtol=1e-5)
    assert logits[:, [0, 4]].abs().max() == 0  # new rows start at zero
    # The saved (nonlinear) model at w0 answers alike; its architecture is the old one with more rows.
    saved = lin.nonlinear()
    torch.testing.assert_close(saved(x)[1], logits, atol=1e-5, rtol=1e-5)
    assert saved.cfg.num_classes == 5 and saved.cfg.negative_slope == 0.1


def test_kfac_on_a_linear_layer_is_the_explicit_kronecker_product():
    gen = torch.Generator().manual_seed(4)
    layer = nn.Linear(3, 2)
    kfac = KFAC(layer, damping=0.1)  # damping 0.1 of each factor's mean eigenvalue
    x = torch.randn(5, 3, generator=gen)
    with kfac.record():
        layer(x)
    g_out = torch.randn(5, 2, generator=gen)  # per-sample gradients at the layer's output
    kfac.update({"": g_out})
    a1 = torch.cat([x, torch.ones(5, 1)], dim=1)  # the bias's constant input
    a, g = a1.T @ a1 / 5, g_out.T @ g_out / 5
    torch.testing.assert_close(kfac.a[""], a)
    torch.testing.assert_close(kfac.g[""], g)

    gw, gb = torch.randn(2, 3, generator=gen), torch.randn(2, generator=gen)
    out = kfac.precondition({"weight": gw, "bias": gb})
    a_d = a + 0.1 * torch.trace(a) / 4 * torch.eye(4)  # damping: 0.1 of the mean eigenvalue
    g_d = g + 0.1 * torch.trace(g) / 2 * torch.eye(2)
    vec = torch.cat([gw, gb[:, None]], dim=1).reshape(-1)  # row-major vec of [dW | db]
    want = torch.linalg.solve(torch.kron(g_d, a_d), vec).reshape(2, 4)
    torch.testing.assert_close(out["weight"], want[:, :3])
    torch.testing.assert_close(out["bias"], want[:, 3])
    torch.testing.assert_close(damped_inverse(a, 0.1), torch.linalg.inv(a_d))


def test_kfac_conv_patches_are_the_weight_gradients_inputs():
    # dL/dW of a conv is sum over locations of g a^T with a the im2col patches: the layout K-FAC's A uses.
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
    kfac = KFAC(conv)
    x = torch.randn(4, 2, 7, 7, generator=gen)
    with kfac.record():
        y = conv(x)
    g_out = torch.randn(y.shape, generator=gen)
    (gw,) = torch.autograd.grad(y, [conv.weight], g_out)
    kfac.update({"": g_out})
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)  # (B*T, C*k*k)
    g_rows = g_out.permute(0, 2, 3, 1).reshape(-1, 3)  # (B*T, out), the same location order
    torch.testing.assert_close(gw.reshape(3, -1), g_rows.T @ patches)
    torch.testing.assert_close(kfac.a[""], patches.T @ patches / len(patches))
    torch.testing.assert_close(kfac.g[""], g_rows.T @ g_rows / 4)  # G: summed over locations, batch mean


@pytest.fixture(scope="module")
def v1(tiny_data, tmp_path_factory):
    """A tiny leaky-ReLU v1 (the paper pretrains with leaky ReLU) over classes 0-4."""
    root = tmp_path_factory.mktemp("lqf-models")
    argv = [
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(root / "v1"),
        "--classes",
        "0-4",
        "--arch",
        "small",
    ]
    assert main([*argv, "--negative-slope", "0.1", "--limit", "200", "--epochs", "1", *FAST]) == 0
    return root / "v1"


def test_lqf_trains_a_loadable_model_that_lowers_the_linear_loss(v1, tiny_data, tmp_path):
    from trainer.artifact import load_model
    from trainer.data import load_split
    from trainer.train import TrainConfig, train

    assert json.loads((v1 / "card.json").read_text())["arch"]["negative_slope"] == 0.1
    out = tmp_path / "v2-lqf"
    cfg = TrainConfig(
        out=str(out),
        data=str(tiny_data),
        old=str(v1),
        lqf=True,
        arch="small",
        epochs=2,
        batch_size=64,
        lr=0.5,
        limit=200,
        eval_limit=100,
        threads=1,
    )
    r = train(cfg)
    card = r.card
    assert card.train_config["lqf"] and card.train_config["lqf_settings"]["negative_slope"] == 0.1
    assert card.train_config["lqf_settings"]["target"] == 4.0 and card.classes == list(range(10))
    assert card.space == "v2-lqf" and card.compatible_with is None
    assert {"linear", "nonlinear", "old_self"} <= set(card.metrics["lqf"])
    assert "v1/v2-lqf" in card.metrics["matrix"]

    saved = load_model(out)  # an ordinary model folder: the nonlinear network at w
    lin = load_linearised(out)
    torch.testing.assert_close(saved.model.head.weight, lin.weights()["head.weight"])

    train_set = load_split(str(tiny_data), "train").take(200, seed=0)
    x = saved.preprocess(torch.from_numpy(train_set.images))
    rows = saved.model.label_to_row(torch.from_numpy(train_set.labels).long())
    start = LinearisedModel(lin.net, lin.classes, lin.cfg)  # delta = 0: the old model
    before = float(lqf_loss(start.outputs(x)[1], rows, 4.0))
    after = float(lqf_loss(lin.outputs(x)[1], rows, 4.0))
    assert after < 0.8 * before, (before, after)
    assert r.history[-1]["lqf_mse"] < r.history[0]["lqf_mse"]


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "--lqf needs --old"),
        (["--old", "{v1}", "--bct"], "does not combine with --bct"),
        (["--old", "{v1}", "--pc", "fd-kl"], "does not combine with --bct"),
        (["--old", "{v1}"], "needs its architecture"),  # the default arch (resnet) is not v1's (small)
        (["--old", "{v1}", "--arch", "small", "--width", "12"], "needs its architecture"),
        (["--old", "{v1}", "--arch", "small", "--negative-slope", "1.5"], "negative_slope must be in"),
    ],
)
def test_lqf_errors_are_one_clear_line(v1, tiny_data, tmp_path, capsys, extra, message):
    argv = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "x"), "--lqf", "--limit", "64", *FAST]
    rc = main(argv + [a.replace("{v1}", str(v1)) for a in extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists()


def test_leaky_relu_is_refused_for_library_backbones():
    with pytest.raises(ConfigError, match="library"):
        build_model("timm:resnet18", [0, 1], negative_slope=0.1)
