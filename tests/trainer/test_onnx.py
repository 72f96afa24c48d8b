"""An ONNX export as a model version: registration checks, embeddings equal to torch's, the head, refusals of
broken or hostile files, and an ONNX folder as the old model of BCT training and of eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.console.cli import main
from tests.support.onnx_models import REGISTER_ARGS, export_model, linear_graph
from trainer.artifact import embed_images, load_model, predict_labels, random_twin, read_card
from trainer.data import load_split
from trainer.errors import ModelCardError, OnnxModelError
from trainer.verify import verify_weights

FAST = ["--epochs", "2", "--batch-size", "64", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    """A tiny trained v1 (classes 0-4), its ONNX exports (with and without logits), and both registered."""
    root = tmp_path_factory.mktemp("onnx")
    torch.set_num_threads(1)
    # 16-d: the tiny sample's embeddings span every dimension, so the logits determine the head's rows
    args = [
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(root / "v1"),
        "--classes",
        "0-4",
        "--embedding-dim",
    ]
    assert main([*args, "16", *FAST]) == 0
    files = {
        "logits": export_model(root / "v1", root / "v1.onnx", logits=True),
        "embedding": export_model(root / "v1", root / "v1-emb.onnx", logits=False),
    }
    for name, version in (("logits", "v1-onnx"), ("embedding", "v1-onnx-emb")):
        args = ["register-onnx", str(files[name]), "--out", str(root / version), *REGISTER_ARGS]
        assert main([*args, "--classes", "0-4", "--data", str(tiny_data), "--threads", "1"]) == 0
    return root


def _register(path: Path, out: Path, tiny_data: Path, *extra: str) -> int:
    args = ["register-onnx", str(path), "--out", str(out), *REGISTER_ARGS, "--data", str(tiny_data)]
    return main([*args, "--classes", "0-4", "--threads", "1", *extra])


def test_registered_export_embeds_like_torch(exported, tiny_data):
    v1, onnx_v1 = load_model(exported / "v1"), load_model(exported / "v1-onnx")
    card = onnx_v1.card
    assert card.format == "onnx" and card.onnx_file == "model.onnx" and card.space == "v1-onnx"
    assert card.onnx_sha256 and card.weights_sha256 and card.embedding_dim == v1.card.embedding_dim
    assert card.preprocess == v1.card.preprocess and card.classes == [0, 1, 2, 3, 4]
    test = load_split(tiny_data, "test")
    a, b = embed_images(v1, test.images), embed_images(onnx_v1, test.images)
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    # The head is fitted to the export's logits: graceful's cosine head is recovered (rows and scale).
    head = card.metrics["head"]
    assert head["method"] == "logits-lstsq" and head["agreement_with_logits"] == 1.0
    cos = torch.nn.functional.cosine_similarity(onnx_v1.model.head.weight, v1.model.head.weight)
    assert float(cos.min()) > 0.999 and abs(onnx_v1.model.head.scale - v1.model.head.scale) < 1e-2
    np.testing.assert_array_equal(predict_labels(onnx_v1, b), predict_labels(v1, a))
    verify_weights(onnx_v1.path, card)  # what a models-dir survey runs
    assert random_twin(onnx_v1) is None  # an ONNX graph has no architecture of ours to randomise
    x = onnx_v1.preprocess(test.images[:3])
    emb, logits = onnx_v1.model(x)  # the EmbeddingModel face
    assert emb.shape == (3, card.embedding_dim) and logits.shape == (3, 5)
    assert not any(p.requires_grad for p in onnx_v1.model.parameters())


def test_an_export_without_logits_gets_class_mean_rows(exported, tiny_data):
    loaded = load_model(exported / "v1-onnx-emb")
    head = loaded.card.metrics["head"]
    assert head["method"] == "class-mean" and loaded.card.arch["logits_output"] is None
    train = load_split(tiny_data, "train").subset([0, 1, 2, 3, 4])
    emb = torch.from_numpy(embed_images(loaded, train.images))
    labels = torch.from_numpy(train.labels)
    means = torch.stack([emb[labels == c].mean(0) for c in range(5)])
    torch.testing.assert_close(loaded.model.head.weight, means, atol=1e-4, rtol=0)
    assert loaded.model.head.scale == 4.0
    assert (exported / "v1-onnx-emb" / "head.safetensors").is_file()
    assert not list((exported / "v1-onnx-emb").glob("*.p*t*"))  # no pickle anywhere


def test_hand_built_graph_with_fixed_batch_registers(tmp_path, tiny_data):
    path = linear_graph(tmp_path / "lin.onnx", dim=8, input_shape=(4, 1, 28, 28))
    assert _register(path, tmp_path / "lin", tiny_data) == 0
    loaded = load_model(tmp_path / "lin")
    assert loaded.card.arch["batch"] == 4 and loaded.card.embedding_dim == 8
    images = load_split(tiny_data, "test").images[:7]  # not a multiple of the fixed batch: padded
    assert embed_images(loaded, images).shape == (7, 8)


@pytest.mark.parametrize(
    ("make", "extra", "reason"),
    [
        (lambda d, p: p, ["--size", "32"], "contract is float \\(N, 1, 32, 32\\)"),
        (lambda d, p: p, ["--channels", "3", "--mean", "0.5", "--std", "0.5"], "contract is float \\(N, 3,"),
        (lambda d, p: linear_graph(d / "evil.onnx", op_domain="com.evil"), [], "com.evil::Evil"),
        (lambda d, p: linear_graph(d / "two.onnx", extra_input=True), [], "2 inputs"),
        (
            lambda d, p: linear_graph(d / "ext.onnx", external_location="../../../etc/passwd"),
            [],
            "external file \\('../../../etc/passwd'\\)",
        ),
        (lambda d, p: p, ["--max-mib", "0.01"], "over the limit of 0.01 MiB \\(raise it with --max-mib\\)"),
        (
            lambda d, p: (
                (d / "junk.onnx").write_bytes(np.random.default_rng(0).bytes(4096)) and d / "junk.onnx"
            ),
            [],
            "not an ONNX model",
        ),
        (lambda d, p: (d / "empty.onnx").write_bytes(b"") == 0 and d / "empty.onnx", [], "not an ONNX model"),
    ],
    ids=[
        "wrong-size",
        "wrong-channels",
        "custom-op",
        "two-inputs",
        "external-data",
        "too-big",
        "garbage",
        "empty",
    ],
)
def test_broken_or_hostile_files_are_refused(exported, tiny_data, tmp_path, capsys, make, extra, reason):
    path = make(tmp_path, exported / "v1.onnx")
    out = tmp_path / "refused"
    assert _register(path, out, tiny_data, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("graceful: error: ") and len(err.strip().splitlines()) == 1
    import re

    assert re.search(reason, err), err
    assert not out.exists() and not list(tmp_path.glob(".refused*"))  # nothing written


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "does not match the checksum in its card"),
        (lambda b: b + bytes(1 << 20), "bytes, its card says"),  # grown: refused before it is read
    ],
    ids=["flipped-byte", "grown"],
)
def test_a_replaced_file_is_refused_at_load_and_survey(exported, tmp_path, change, reason):
    import shutil

    folder = tmp_path / "v1-onnx"
    shutil.copytree(exported / "v1-onnx", folder)
    card = read_card(folder)
    onnx_file = folder / "model.onnx"
    onnx_file.write_bytes(change(onnx_file.read_bytes()))
    for check in (lambda: load_model(folder), lambda: verify_weights(folder, card)):
        with pytest.raises(ModelCardError, match=reason):
            check()


def test_a_hostile_graph_slipped_in_with_its_checksum_is_refused(exported, tmp_path):
    """A card edited by hand to match a replaced file: the graph is checked again, at survey and at load."""
    import hashlib
    import shutil

    folder = tmp_path / "v1-onnx"
    shutil.copytree(exported / "v1-onnx", folder)
    evil = linear_graph(tmp_path / "evil.onnx", dim=read_card(folder).embedding_dim, op_domain="com.evil")
    shutil.copy(evil, folder / "model.onnx")
    raw = json.loads((folder / "card.json").read_text())
    raw["onnx_sha256"] = hashlib.sha256(evil.read_bytes()).hexdigest()
    raw["arch"]["onnx_bytes"] = evil.stat().st_size
    (folder / "card.json").write_text(json.dumps(raw))
    card = read_card(folder)
    for check in (lambda: load_model(folder), lambda: verify_weights(folder, card)):
        with pytest.raises(OnnxModelError, match="com.evil"):
            check()


def test_a_card_pointing_outside_its_folder_is_refused(exported, tmp_path):
    import shutil

    folder = tmp_path / "v1-onnx"
    shutil.copytree(exported / "v1-onnx", folder)
    raw = json.loads((folder / "card.json").read_text())
    raw["onnx_file"] = "../v1.onnx"
    (folder / "card.json").write_text(json.dumps(raw))
    with pytest.raises(ModelCardError, match="onnx_file must be a .onnx file name inside the folder"):
        read_card(folder)


def test_registration_refuses_an_existing_folder_and_logits_of_another_width(exported, tiny_data, capsys):
    assert _register(exported / "v1.onnx", exported / "v1-onnx", tiny_data) == 2
    assert "already exists" in capsys.readouterr().err
    args = ["register-onnx", str(exported / "v1.onnx"), "--out", str(exported / "x"), *REGISTER_ARGS]
    assert main([*args, "--data", str(tiny_data), "--classes", "0-6"]) == 2
    assert "writes 5 logits, but the card has 7 classes" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("old", ["v1-onnx", "v1-onnx-emb"])
def test_bct_against_an_onnx_folder_trains_and_evaluates(exported, tiny_data, tmp_path, old):
    out = tmp_path / f"v2-{old}"
    args = ["train", "--data", str(tiny_data), "--out", str(out), "--old", str(exported / old), "--bct"]
    assert main([*args, "--embedding-dim", "16", *FAST]) == 0
    card = read_card(out)
    assert card.compatible_with == old and card.space == old and card.format == "graceful-model/1"
    assert f"{out.name}/{old}" in card.metrics["matrix"]
    verify_weights(exported / old, read_card(exported / old))  # the old folder is as registered
    report = tmp_path / "eval.json"
    assert main(["eval", str(exported / old), str(out), "--data", str(tiny_data), "--json", str(report)]) == 0
    matrix = json.loads(report.read_text())["matrix"]
    assert {f"{old}/{old}", f"{out.name}/{old}", f"{out.name}/{out.name}"} <= set(matrix)
