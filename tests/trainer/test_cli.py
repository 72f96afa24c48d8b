"""The CLI end to end on tiny synthetic data: whole trainings in-process through ``main([...])``."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from service.console.cli import main

FAST = ["--epochs", "1", "--batch-size", "64", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    assert (
        main(["train", "--data", str(tiny_data), "--out", str(root / "v1"), "--classes", "0-4", *FAST]) == 0
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(tiny_data),
                "--out",
                str(root / "v2"),
                "--old",
                str(root / "v1"),
                "--bct",
                "--width",
                "12",
                *FAST,
            ]
        )
        == 0
    )
    assert main(["train", "--data", str(tiny_data), "--out", str(root / "v2-indep"), *FAST]) == 0
    return root


def test_train_writes_cards_with_lineage(trained):
    v1 = json.loads((trained / "v1" / "card.json").read_text())
    v2 = json.loads((trained / "v2" / "card.json").read_text())
    ind = json.loads((trained / "v2-indep" / "card.json").read_text())
    assert v1["classes"] == [0, 1, 2, 3, 4] and v1["space"] == "v1" and v1["compatible_with"] is None
    assert v2["classes"] == list(range(10)) and v2["space"] == "v1" and v2["compatible_with"] == "v1"
    assert v2["train_config"]["bct"] == "full" and v2["arch"]["width"] == 12
    assert ind["space"] == "v2-indep" and ind["compatible_with"] is None
    # The card carries the compatibility matrix against the parent.
    assert {"v2/v1", "v2/v2", "v1/v1"} <= set(v2["metrics"]["matrix"])
    assert "v2/v1" in v2["metrics"]["bct"]


def test_training_is_reproducible(tiny_data, tmp_path):
    args = ["train", "--data", str(tiny_data), "--classes", "0-4", "--limit", "120", *FAST]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = (
        load_file(str(tmp_path / "a" / "weights.safetensors")),
        load_file(str(tmp_path / "b" / "weights.safetensors")),
    )
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_eval_writes_contract_json_and_heatmap(trained, tiny_data, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(
        [
            "eval",
            str(trained / "v1"),
            str(trained / "v2"),
            str(trained / "v2-indep"),
            "--data",
            str(tiny_data),
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "m.png"),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["models"] == ["v1", "v2", "v2-indep"]
    assert len(report["matrix"]) == 9
    cell = report["matrix"]["v2/v1"]
    assert {"top1", "top5", "mAP", "old_classes", "new_classes"} <= set(cell)
    assert "v2/v1" in report["bct"] and "update_gain" in report["bct"]["v2/v1"]
    assert {"nfr", "rel_nfr", "err_old", "err_new", "flipped"} <= set(report["flips"]["v1->v2"])
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mAP (query \\ gallery)" in capsys.readouterr().out


def _one_line_error(capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err and needle in err, err


def test_bad_arguments_give_one_clear_line(trained, tiny_data, tmp_path, capsys):
    base = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "x"), *FAST]
    _one_line_error(capsys, [*base, "--classes", "0-12"], "unknown class 12")
    _one_line_error(capsys, [*base, "--classes", "zero-four"], "bad class range")
    _one_line_error(capsys, [*base, "--old", str(tmp_path / "missing"), "--bct"], "does not exist")
    _one_line_error(
        capsys,
        [*base, "--old", str(trained / "v1"), "--bct", "--embedding-dim", "64"],
        "embedding size mismatch",
    )
    _one_line_error(capsys, [*base, "--bct"], "--bct needs --old")
    bct = [*base, "--old", str(trained / "v1"), "--bct"]
    _one_line_error(capsys, [*bct, "--influence-scale", "0"], "influence scale must be > 0")
    _one_line_error(capsys, [*bct, "--class-mean-weight", "-1"], "BCT weights must be >= 0")
    _one_line_error(capsys, [*bct, "--pulls-on", "new"], "invalid choice")
    _one_line_error(capsys, [*bct, "--new-rows", "median"], "invalid choice")
    _one_line_error(
        capsys,
        ["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "y")],
        "dataset-fashion-mnist",
    )
    _one_line_error(
        capsys, ["eval", str(tmp_path / "missing"), "--json", str(tmp_path / "r.json")], "does not exist"
    )
    _one_line_error(capsys, ["frobnicate"], "unknown command")
    assert not (tmp_path / "x").exists()


def test_a_model_is_reused_only_while_its_bct_recipe_is_unchanged(trained, tiny_data, monkeypatch):
    from trainer.losses import BCTWeights
    from trainer.train import TrainConfig, reusable

    card = json.loads((trained / "v2" / "card.json").read_text())
    cfg = TrainConfig(
        **{k: v for k, v in card["train_config"].items() if k in TrainConfig.__dataclass_fields__}
    )
    assert card["train_config"]["bct_weights"]["influence"] == BCTWeights.recipe("full").influence
    assert reusable(cfg)
    changed = BCTWeights(influence=3.0)
    monkeypatch.setattr(BCTWeights, "recipe", classmethod(lambda cls, name: changed))
    assert not reusable(cfg)  # same flags, other recipe defaults: retrain


def test_a_card_from_before_a_recipe_field_existed_is_reused_at_its_default(
    trained, tiny_data, tmp_path, monkeypatch
):
    import shutil

    from trainer.losses import BCTWeights
    from trainer.train import TrainConfig, reusable

    old_card = tmp_path / "v2"
    shutil.copytree(trained / "v2", old_card)
    card = json.loads((old_card / "card.json").read_text())
    # Written before `new_rows` existed: no such key, trained with its dataclass default (class-mean rows).
    del card["train_config"]["new_rows"]
    weights = card["train_config"]["bct_weights"]
    del weights["new_rows"]
    (old_card / "card.json").write_text(json.dumps(card))
    cfg = TrainConfig(
        **{
            **{k: v for k, v in card["train_config"].items() if k in TrainConfig.__dataclass_fields__},
            "out": str(old_card),
        }
    )
    assert not reusable(cfg)  # the full recipe now refines the new rows: retrain
    monkeypatch.setattr(BCTWeights, "recipe", classmethod(lambda cls, name: BCTWeights(**weights)))
    assert reusable(cfg)  # the same weights, the missing field at its default: reuse
