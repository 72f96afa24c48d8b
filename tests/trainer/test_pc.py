"""Positive-congruent training: focal weights, the two focal distillation losses, and training through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from service.console.cli import main
from trainer.errors import ConfigError, IncompatibleModelsError
from trainer.losses import FocalDistillation, focal_distillation, focal_weights, shared_class_rows
from trainer.model import build_model

FAST = ["--epochs", "1", "--batch-size", "64", "--quiet", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/trainer/conftest.py


def _old_logits_and_rows():
    # Old head over classes [0, 1, 2]; 4 samples: right, wrong, right, and one of class 3 the old head lacks.
    old_logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 5.0, 0.0]])
    old_rows = torch.tensor([0, 1, 2, -1])
    return old_logits, old_rows


def test_focal_weights_are_zero_where_the_old_model_is_wrong_for_alpha_zero():
    old_logits, old_rows = _old_logits_and_rows()
    assert focal_weights(old_logits, old_rows, alpha=0.0, beta=5.0).tolist() == [5.0, 0.0, 5.0, 0.0]
    # With alpha > 0 the wrong (and unknown-class) samples keep the minimal weight alpha.
    assert focal_weights(old_logits, old_rows, alpha=1.0, beta=5.0).tolist() == [6.0, 1.0, 6.0, 1.0]


@pytest.mark.parametrize("kind", ["fd-kl", "fd-lm", "kd"])
def test_losses_return_named_terms_and_vanish_when_new_equals_old(kind):
    old_logits, old_rows = _old_logits_and_rows()
    shared = (torch.arange(3), torch.arange(3))
    cfg = FocalDistillation.preset(kind)
    same = focal_distillation(old_logits.clone(), old_logits, old_rows, shared, cfg)
    assert list(same) == [kind.replace("-", "_")]
    assert float(same[cfg.term]) == pytest.approx(0.0, abs=1e-6)
    other = focal_distillation(torch.zeros(4, 3), old_logits, old_rows, shared, cfg)
    assert float(other[cfg.term]) > 0.1


def test_fd_lm_is_weighted_half_squared_logit_distance():
    old_logits, old_rows = _old_logits_and_rows()
    new_logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    cfg = FocalDistillation(kind="fd-lm", alpha=1.0, beta=5.0, weight=2.0)
    got = focal_distillation(new_logits, old_logits, old_rows, (torch.arange(3), torch.arange(3)), cfg)[
        "fd_lm"
    ]
    w = torch.tensor([6.0, 1.0, 6.0, 1.0])
    expected = 2.0 * (w * 0.5 * (new_logits - old_logits).pow(2).sum(1)).mean()
    torch.testing.assert_close(got, expected)


def test_fd_kl_matches_kl_div_and_ignores_old_wrong_samples_for_alpha_zero():
    old_logits, old_rows = _old_logits_and_rows()
    new_logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    cfg = FocalDistillation(kind="fd-kl", alpha=0.0, beta=1.0, temperature=2.0)
    loss = focal_distillation(new_logits, old_logits, old_rows, (torch.arange(3), torch.arange(3)), cfg)[
        "fd_kl"
    ]
    per = (
        F.kl_div(
            F.log_softmax(new_logits / 2, 1),
            F.log_softmax(old_logits / 2, 1),
            log_target=True,
            reduction="none",
        ).sum(1)
        * 4
    )
    torch.testing.assert_close(loss, (per * torch.tensor([1.0, 0.0, 1.0, 0.0])).mean())
    loss.backward()
    assert new_logits.grad is not None
    assert new_logits.grad[[1, 3]].abs().max() == 0  # no pull where the old model is wrong or ignorant
    assert new_logits.grad[[0, 2]].abs().max() > 0


def test_distillation_runs_over_the_classes_both_models_know():
    old_idx, new_idx = shared_class_rows([0, 1, 2, 3, 4], [0, 2, 4, 5, 6, 7, 8, 9, 1, 3])
    assert old_idx.tolist() == [0, 1, 2, 3, 4] and new_idx.tolist() == [0, 8, 1, 9, 2]
    old_logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    new_logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(3), requires_grad=True)
    cfg = FocalDistillation.preset("fd-kl")
    focal_distillation(new_logits, old_logits, torch.zeros(6, dtype=torch.long), (old_idx, new_idx), cfg)[
        "fd_kl"
    ].backward()
    assert new_logits.grad is not None
    untouched = [i for i in range(10) if i not in new_idx.tolist()]  # classes only the new model knows
    assert new_logits.grad[:, untouched].abs().max() == 0
    with pytest.raises(IncompatibleModelsError, match="none in common"):
        shared_class_rows([0, 1], [2, 3])


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="unknown PC loss"):
        FocalDistillation(kind="focal")
    with pytest.raises(ConfigError, match="alpha"):
        FocalDistillation(alpha=0.0, beta=0.0)
    assert FocalDistillation.preset("kd").beta == 0.0 and FocalDistillation.preset("fd-lm").beta == 5.0


def test_focal_distillation_steps_make_the_new_model_agree_with_the_old():
    torch.manual_seed(0)
    old = build_model("small", list(range(5)), width=4).eval().requires_grad_(False)
    new = build_model("small", list(range(5)), width=6)
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        old_logits = old(x)[1]
    target = old_logits.argmax(1)  # labels = the old model's answers: the old model is right everywhere
    shared = shared_class_rows(old.classes, new.classes)
    cfg = FocalDistillation(kind="fd-lm", alpha=0.0, beta=1.0)
    opt = torch.optim.Adam(new.parameters(), lr=1e-2)

    def agreement() -> float:
        new.eval()
        with torch.no_grad():
            a = float((new(x)[1].argmax(1) == target).float().mean())
        new.train()
        return a

    before = agreement()
    for _ in range(40):
        loss = focal_distillation(new(x)[1], old_logits, target, shared, cfg)["fd_lm"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert agreement() >= max(0.9, before + 0.2)


@pytest.fixture(scope="module")
def v1(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pc-models")
    assert main(["train", "--data", str(tiny_data), "--out", str(root / "v1"), "--limit", "200", *FAST]) == 0
    return root / "v1"


@pytest.mark.parametrize("kind,bct", [("fd-kl", True), ("fd-lm", False)])
def test_pc_trains_in_process_through_the_cli(v1, tiny_data, tmp_path, kind, bct):
    out = tmp_path / f"v2-{kind}"
    argv = [
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--old",
        str(v1),
        "--pc",
        kind,
        "--pc-beta",
        "3",
        "--width",
        "12",
        "--limit",
        "200",
        *FAST,
    ]
    assert main(argv + (["--bct"] if bct else [])) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["train_config"]["pc"] == kind and card["train_config"]["pc_beta"] == 3.0
    # PC alone keeps the model in its own space; with --bct it joins v1's.
    assert card["space"] == ("v1" if bct else out.name)
    assert card["compatible_with"] == ("v1" if bct else None)
    assert f"v1->{out.name}" in card["metrics"]["flips"]


@pytest.mark.parametrize("bct, pc", [("plain", "fd-kl"), ("full", "fd-lm")])
def test_bct_and_pc_combine_their_terms(bct, pc, v1, tiny_data, tmp_path):
    # `graceful train --bct B --pc P --old v1`: the task, BCT's terms and focal distillation in one loss,
    # each logged by the training loop; the model joins v1's space.
    from trainer.train import TrainConfig, train

    r = train(
        TrainConfig(
            out=str(tmp_path / "v2"),
            data=str(tiny_data),
            old=str(v1),
            bct=bct,
            pc=pc,
            epochs=1,
            batch_size=64,
            limit=128,
            threads=1,
            eval_limit=50,
        )
    )
    pc_term = pc.replace("-", "_")
    bct_terms = {k for k in r.history[0] if k not in ("epoch", "task", pc_term)}
    assert {"task", "influence", pc_term} <= set(r.history[0]), r.history[0]
    if bct == "full":  # the full recipe adds its pulls to the influence loss
        assert len(bct_terms) >= 2, r.history[0]
    assert r.card.compatible_with == "v1" and r.card.train_config["pc"] == pc


def test_cached_old_logits_train_as_the_old_model_run_every_step(v1, tiny_data, tmp_path):
    # Without augmentation the cached teacher saw exactly the images the new model sees: the same losses,
    # step for step (up to the old model's batching), and the same terms.
    from trainer.train import TrainConfig, train

    common = dict(
        data=str(tiny_data),
        old=str(v1),
        pc="fd-kl",
        bct="full",
        epochs=2,
        batch_size=64,
        limit=128,
        threads=1,
        eval_limit=30,
        augment=False,
    )
    live = train(TrainConfig(out=str(tmp_path / "live"), **common))
    cached = train(TrainConfig(out=str(tmp_path / "cached"), cache_old_logits=True, **common))
    assert cached.card.train_config["cache_old_logits"] is True
    for a, b in zip(live.history, cached.history, strict=True):
        assert set(a) == set(b)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_cached_old_logits_with_augmentation_warn(v1, tiny_data, tmp_path, caplog):
    # The cached teacher saw the clean images: with augmentation its targets are not its answers on the views.
    from trainer.train import TrainConfig, train

    common = dict(data=str(tiny_data), old=str(v1), pc="fd-lm", epochs=1, batch_size=64, limit=128)
    common |= dict(threads=1, eval_limit=30, cache_old_logits=True)
    with caplog.at_level("WARNING", logger="trainer.train"):
        train(TrainConfig(out=str(tmp_path / "aug"), **common))
    assert any("--no-augment" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="trainer.train"):
        train(TrainConfig(out=str(tmp_path / "plain"), augment=False, **common))
    assert not any("--cache-old-logits" in r.getMessage() for r in caplog.records)


def test_cached_old_logits_need_pc(v1, tiny_data, tmp_path, capsys):
    rc = main(
        ["train", "--data", str(tiny_data), "--out", str(tmp_path / "x"), "--old", str(v1), "--bct"]
        + ["--cache-old-logits", *FAST]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--cache-old-logits" in err and "--pc" in err


def test_pc_without_old_is_one_clear_line(tiny_data, tmp_path, capsys):
    rc = main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "x"), "--pc", "fd-kl", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--pc needs --old" in err


def test_eval_lists_the_flipped_examples(v1, tiny_data, tmp_path, capsys):
    # v2 is v1 with its head rows rolled by one: every test image v1 labels right, v2 labels as the next class,
    # so the flips are exactly v1's correct answers (deterministic, however well the tiny v1 trained).
    from trainer.artifact import load_model, save_model

    loaded = load_model(v1)
    with torch.no_grad():
        loaded.model.head.weight.copy_(loaded.model.head.weight.roll(1, dims=0))
    v2 = tmp_path / "v2"
    save_model(v2, loaded.model, loaded.card.model_copy(update={"version": "v2"}))
    rc = main(
        [
            "eval",
            str(v1),
            str(v2),
            "--data",
            str(tiny_data),
            "--json",
            str(tmp_path / "r.json"),
            "--show-flips",
            "3",
        ]
    )
    assert rc == 0
    flips = json.loads((tmp_path / "r.json").read_text())["flips"]["v1->v2"]
    assert flips["n_flips"] == round((1 - flips["err_old"]) * flips["n"]) > 3
    assert (
        len(flips["flipped"])
        == len(flips["flipped_label"])
        == len(flips["flipped_new_pred"])
        == flips["n_flips"]
    )
    assert all(t != p for t, p in zip(flips["flipped_label"], flips["flipped_new_pred"], strict=True))
    # Retrieval flips: v2 embeds as v1 does (only its head moved), so no query's top-1 changes.
    report = json.loads((tmp_path / "r.json").read_text())
    rflips = report["retrieval_flips"]["v1->v2"]
    assert set(rflips) == {"new/old", "new/new"}
    assert rflips["new/old"]["old_setting"] == "v1/v1" and rflips["new/old"]["new_setting"] == "v2/v1"
    for r in rflips.values():
        assert r["n_negative"] == r["n_positive"] == 0 and r["nfr"] == r["pfr"] == 0.0
        assert r["top1_old"] == r["top1_new"] == report["matrix"]["v1/v1"]["top1"]
        assert r["n"] == report["matrix"]["v1/v1"]["n_queries"] and r["flipped_negative"] == []
    printed = capsys.readouterr().out
    assert "retrieval flips v1->v2, v2/v1 against v1/v1" in printed
    first = flips["flipped"][0]
    assert f"test #{first} " in printed and printed.count("test #") == 3
    assert f"and {flips['n_flips'] - 3} more" in printed
