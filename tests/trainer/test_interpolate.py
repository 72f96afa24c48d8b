"""Backward-compatible weight interpolation (BCWI): the mix of two models' weights, its card, its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.console.cli import main
from trainer.artifact import ModelCard, embed_images, load_model, save_model
from trainer.errors import ConfigError, IncompatibleModelsError, ModelCardError
from trainer.interpolate import InterpolateConfig, interpolate, interpolate_states
from trainer.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/trainer/conftest.py

IMAGES = np.random.default_rng(0).integers(0, 255, (6, 1, 28, 28), dtype=np.uint8)


def _save(
    folder: Path,
    seed: int,
    classes: tuple[int, ...] = (0, 1, 2),
    width: int | None = None,
    space: str | None = None,
    batches: int = 0,
) -> Path:
    """A small seeded model version; ``batches`` forward passes in train mode give it BatchNorm statistics
    (and a ``num_batches_tracked``) of its own."""
    torch.manual_seed(seed)
    model = build_model("small", list(classes), width=width)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, 1, 28, 28) * (1 + seed))
    card = ModelCard(
        version=folder.name,
        arch=model.cfg.to_dict(),
        embedding_dim=model.cfg.embedding_dim,
        classes=list(classes),
        space=space or folder.name,
        compatible_with=None if space is None else space,
    )
    save_model(folder, model.eval(), card)
    return folder


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    return _save(tmp_path / "old", seed=0, batches=1), _save(tmp_path / "new", seed=1, batches=3)


def _mix(pair, tmp_path, alpha: float, name: str = "mix") -> Path:
    old, new = pair
    cfg = InterpolateConfig(old=str(old), new=str(new), alpha=alpha, out=str(tmp_path / name), evaluate=False)
    return interpolate(cfg).path


@pytest.mark.parametrize("alpha,same_as", [(0.0, "new"), (1.0, "old")])
def test_the_ends_give_either_model_exactly(pair, tmp_path, alpha, same_as):
    mixed = load_model(_mix(pair, tmp_path, alpha))
    ref = load_model(pair[1] if same_as == "new" else pair[0])
    np.testing.assert_array_equal(embed_images(mixed, IMAGES), embed_images(ref, IMAGES))


def test_the_middle_mixes_every_float_tensor_and_keeps_the_new_counters(pair, tmp_path):
    old, new = (load_model(p).model.state_dict() for p in pair)
    mixed = load_model(_mix(pair, tmp_path, 0.25)).model.state_dict()
    counters = [k for k in new if k.endswith("num_batches_tracked")]
    stats = [k for k in new if k.endswith("running_mean") or k.endswith("running_var")]
    assert counters and stats
    for k in counters:  # the new model's counter (3 batches), not a mix with the old's (1)
        assert int(mixed[k]) == int(new[k]) == 3 and int(old[k]) == 1
    for k, v in new.items():
        if v.is_floating_point():
            torch.testing.assert_close(mixed[k], 0.75 * v + 0.25 * old[k])
    assert any(not torch.equal(old[k], new[k]) for k in stats)  # the statistics did differ, and were mixed


def test_the_card_records_the_interpolation(pair, tmp_path):
    card = json.loads((_mix(pair, tmp_path, 0.3) / "card.json").read_text())
    tc = card["train_config"]
    assert tc["method"] == "bcwi" and tc["alpha"] == 0.3
    assert (tc["old_version"], tc["new_version"]) == ("old", "new")
    assert tc["old_weights_sha256"] == json.loads((pair[0] / "card.json").read_text())["weights_sha256"]
    # two independent models: the mix belongs to neither space and founds its own
    assert card["space"] == "mix" and card["compatible_with"] is None


def test_a_mix_within_one_space_stays_in_it(tmp_path):
    old = _save(tmp_path / "v1", seed=0)
    new = _save(tmp_path / "v2", seed=1, space="v1")  # a BCT child of v1, by its card
    cfg = InterpolateConfig(old=str(old), new=str(new), alpha=0.5, out=str(tmp_path / "v2b"), evaluate=False)
    card = interpolate(cfg).card
    assert card.space == "v1" and card.compatible_with == "v1"


def test_mismatched_models_are_refused(tmp_path):
    old = _save(tmp_path / "old", seed=0)
    wide = _save(tmp_path / "wide", seed=1, width=12)
    more = _save(tmp_path / "more", seed=1, classes=(0, 1, 2, 3))
    other = _save(tmp_path / "other", seed=1, classes=(0, 1, 3))
    for new, what in ((wide, "architectures differ"), (more, "classes differ"), (other, "classes differ")):
        cfg = InterpolateConfig(
            old=str(old), new=str(new), alpha=0.5, out=str(tmp_path / "x"), evaluate=False
        )
        with pytest.raises(IncompatibleModelsError, match=what):
            interpolate(cfg)
    with pytest.raises(IncompatibleModelsError, match="different tensors"):
        interpolate_states({"a": torch.zeros(2)}, {"b": torch.zeros(2)}, 0.5)
    with pytest.raises(IncompatibleModelsError, match="tensor a"):
        interpolate_states({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, 0.5)
    assert not (tmp_path / "x").exists()


def test_bad_alpha_missing_folders_and_clashing_names_are_refused(pair, tmp_path):
    old, new = pair
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="alpha"):
            _mix(pair, tmp_path, alpha)
    with pytest.raises(ModelCardError, match="does not exist"):
        interpolate(
            InterpolateConfig(old=str(tmp_path / "nope"), new=str(new), alpha=0.5, out=str(tmp_path / "m"))
        )
    with pytest.raises(ConfigError, match="--new model's folder"):
        interpolate(InterpolateConfig(old=str(old), new=str(new), alpha=0.5, out=str(new)))


def _cli(*argv: str) -> list[str]:
    return ["interpolate", *argv]


def test_cli_writes_the_mix_and_says_what_it_is(pair, tmp_path, capsys):
    old, new = pair
    rc = main(
        _cli(
            "--old", str(old), "--new", str(new), "--alpha", "0.2", "--out", str(tmp_path / "m"), "--no-eval"
        )
    )
    out = capsys.readouterr().out
    assert rc == 0 and "(1 - 0.2) * new + 0.2 * old" in out
    assert load_model(tmp_path / "m").card.train_config["alpha"] == 0.2


@pytest.mark.parametrize(
    "args,message",
    [
        (("--alpha", "1.5"), "--alpha: must be in [0, 1]"),
        (("--alpha", "half"), "expected a number in [0, 1]"),
        (("--alpha", "0.5", "--old", "NOPE"), "--old model folder NOPE does not exist"),
        (("--alpha", "0.5", "--new", "WIDE"), "architectures differ"),
    ],
)
def test_cli_errors_are_one_clear_line(pair, tmp_path, capsys, args, message):
    old, new = pair
    wide = _save(tmp_path / "wide", seed=2, width=12)
    given = dict(zip(args[::2], args[1::2], strict=True))
    folders = {"NOPE": str(tmp_path / "nope"), "WIDE": str(wide)}
    argv = _cli(
        "--old",
        folders.get(given.get("--old", ""), str(old)),
        "--new",
        folders.get(given.get("--new", ""), str(new)),
        "--alpha",
        given["--alpha"],
        "--out",
        str(tmp_path / "m"),
        "--no-eval",
    )
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message.replace("NOPE", str(tmp_path / "nope")) in err, err


def test_the_card_carries_metrics_against_both_parents(pair, tmp_path, tiny_data):
    old, new = pair
    cfg = InterpolateConfig(
        old=str(old), new=str(new), alpha=0.5, out=str(tmp_path / "mix"), data=str(tiny_data), eval_limit=60
    )
    metrics = interpolate(cfg).card.metrics
    assert {"old/old", "mix/old", "mix/mix", "new/new"} <= set(metrics["matrix"])
    assert set(metrics["flips"]) == {"old->mix", "new->mix"}
    flips = metrics["retrieval_flips"]["old->mix"]
    assert set(flips) == {"new/old", "new/new"} and flips["new/old"]["new_setting"] == "mix/old"
    assert not any(k.startswith("flipped") for k in flips["new/old"])  # the card keeps no example lists
    assert load_model(tmp_path / "mix").card.metrics == metrics
