"""Library backbones (--arch timm:NAME, trainer/backbones.py).

The tests marked ``backbones`` need timm, so they run in the backbones venv (`bash scripts/install-backbones.sh`,
then ``.venv-backbones/bin/python -m pytest -m backbones``); the rest run in every venv, and check what a venv
without the library says.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from service.console.cli import main
from trainer.artifact import ModelCard, embed_images, file_sha256, load_model, save_model
from trainer.errors import ConfigError, ModelCardError
from trainer.model import build_model

FAST = ["--epochs", "1", "--batch-size", "32", "--quiet", "--threads", "1", "--limit", "96"]
ARCH = "timm:resnet18"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/trainer/conftest.py
backbones = pytest.mark.backbones


def _timm_state(in_chans: int = 3, name: str = "resnet18") -> dict[str, torch.Tensor]:
    """A library model's own state dict, classifier included (as timm publishes model.safetensors)."""
    import timm

    torch.manual_seed(7)
    model = timm.create_model(name, pretrained=False, in_chans=in_chans)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _card(model, version: str) -> ModelCard:
    return ModelCard(
        version=version,
        arch=model.cfg.to_dict(),
        embedding_dim=model.cfg.embedding_dim,
        classes=model.classes,
        space=version,
        compatible_with=None,
    )


# --- in every venv: the library is optional, and its absence is said plainly --------------------------------


@pytest.fixture
def no_timm(monkeypatch):
    """timm made unimportable (a None entry in sys.modules), as in a venv without the extra."""
    monkeypatch.setitem(sys.modules, "timm", None)


def test_without_the_library_train_names_the_extra(no_timm, tiny_data, tmp_path, capsys):
    argv = ["train", "--arch", ARCH, "--data", str(tiny_data), "--out", str(tmp_path / "r18"), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "timm:resnet18 needs the model library timm" in err
    assert "'backbones'" in err and "install-backbones.sh" in err
    assert not (tmp_path / "r18").exists()


def test_without_the_library_a_library_card_is_refused_naming_the_extra(no_timm, tmp_path):
    folder = tmp_path / "r18"
    folder.mkdir()
    arch = {"name": ARCH, "embedding_dim": 16, "num_classes": 2, "in_channels": 1, "scale": 4.0}
    card = {"version": "r18", "arch": arch, "embedding_dim": 16, "classes": [0, 1], "space": "r18"}
    (folder / "card.json").write_text(json.dumps({**card, "compatible_with": None}))
    save_file({"head.weight": torch.zeros(2, 16)}, str(folder / "weights.safetensors"))
    with pytest.raises(
        ModelCardError, match=r"model r18: timm:resnet18 needs the model library timm.*backbones"
    ):
        load_model(folder)


def test_library_names_are_checked_before_any_import(no_timm):
    with pytest.raises(ConfigError, match="torchvision's models are not wired in"):
        build_model("torchvision:resnet18", [0, 1])
    with pytest.raises(ConfigError, match="unknown model library 'keras'"):
        build_model("keras:resnet18", [0, 1])
    with pytest.raises(ConfigError, match="names no model"):
        build_model("timm:", [0, 1])
    with pytest.raises(ConfigError, match="unknown arch 'resnet18'.*timm:NAME"):
        build_model("resnet18", [0, 1])


def test_a_preset_card_is_unchanged_and_takes_no_backbone_weights(tmp_path):
    model = build_model("resnet", [0, 1])
    assert model.cfg.to_dict() == {
        "name": "resnet",
        "width": 16,
        "depth": 1,
        "stages": 3,
        "embedding_dim": 128,
        "num_classes": 2,
        "in_channels": 1,
        "scale": 4.0,
        "stem_stride": 1,
    }
    with pytest.raises(ConfigError, match="initialises a library backbone"):
        build_model("resnet", [0, 1], backbone_weights=str(tmp_path / "w.safetensors"))


# --- in the backbones venv: the library's networks, end to end ----------------------------------------------


@backbones
@pytest.mark.parametrize("channels", [1, 3])
def test_a_library_backbone_trains_saves_and_loads_with_identical_embeddings(channels, tmp_path):
    torch.manual_seed(0)
    model = build_model(ARCH, [0, 1, 2], embedding_dim=32, in_channels=channels, input_size=(32, 32))
    # The same split as a preset: embed -> (B, D) unit norm, classify -> (B, K) by the cosine head.
    x = torch.randn(8, channels, 32, 32)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    body_before = model.backbone.body.conv1.weight.detach().clone()
    model.train()
    for _ in range(2):
        emb, logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, model.label_to_row(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(body_before, model.backbone.body.conv1.weight)  # the library's layers learn too
    model.eval()
    with torch.no_grad():
        emb = model.embed(x)
    assert emb.shape == (8, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(8))
    assert model.classify(emb).shape == (8, 3)
    assert type(model.head).__name__ == "CosineHead"

    card = save_model(tmp_path / "r18", model, _card(model, "r18"))
    assert card.arch["name"] == ARCH and card.arch["library"] == "timm"
    assert card.arch["library_version"] and "width" not in card.arch
    loaded = load_model(tmp_path / "r18")
    with torch.no_grad():
        assert torch.equal(loaded.model.embed(x), emb)
    images = np.random.default_rng(0).integers(0, 256, (5, channels, 32, 32), dtype=np.uint8)
    assert embed_images(loaded, images).shape == (5, 32)  # what the service calls


@pytest.fixture(scope="module")
def v1(tiny_data, tmp_path_factory):
    """A preset v1 (classes 0-4) for the library backbone to stay compatible with."""
    root = tmp_path_factory.mktemp("models")
    argv = ["train", "--data", str(tiny_data), "--out", str(root / "v1"), "--classes", "0-4", *FAST]
    assert main(argv) == 0
    return root / "v1"


@pytest.fixture(scope="module")
def r18_child(v1, tiny_data):
    """timm:resnet18 trained with BCT against the preset v1, next to it (a models dir of two versions)."""
    from trainer.train import TrainConfig, train

    cfg = TrainConfig(
        out=str(v1.parent / "r18"),
        data=str(tiny_data),
        arch=ARCH,
        old=str(v1),
        bct="full",
        epochs=1,
        batch_size=32,
        limit=96,
        threads=1,
    )
    return train(cfg)


@backbones
def test_a_library_backbone_trains_as_a_bct_child_of_a_preset(v1, r18_child, tiny_data, tmp_path, capsys):
    card = r18_child.card
    assert card.arch["name"] == ARCH and card.compatible_with == "v1" and card.space == "v1"
    # The new embeddings went through the old model's cosine head (the influence term) every step.
    assert {"task", "influence", "to_class_mean"} <= set(r18_child.history[0])
    assert card.metrics["matrix"]["r18/v1"]  # evaluated against v1 like any BCT child
    loaded, old = load_model(r18_child.path), load_model(v1)
    with torch.no_grad():
        logits = old.model.classify(loaded.model.embed(torch.randn(4, 1, 28, 28)))
    assert logits.shape == (4, 5)
    # eval and adapt take it like a preset.
    argv = [
        "eval",
        str(v1),
        str(r18_child.path),
        "--data",
        str(tiny_data),
        "--json",
        str(tmp_path / "e.json"),
    ]
    assert main(argv) == 0
    assert json.loads((tmp_path / "e.json").read_text())["bct"]["r18/v1"]
    models = tmp_path / "models"  # an adapter lives next to the model it adapts
    shutil.copytree(v1.parent, models)
    argv = ["adapt", "--new", str(models / "r18"), "--old", str(models / "v1"), "--out", str(models / "r18a")]
    assert main([*argv, "--sample", "200", "--data", str(tiny_data)]) == 0
    adapted = load_model(models / "r18a")
    assert adapted.card.adapter_of == "r18" and adapted.model.fused  # folded into the backbone's projection
    capsys.readouterr()


@backbones
def test_the_service_serves_a_library_backbone(v1, r18_child, tiny_data, tmp_path):
    from service.images import encode_png_base64
    from tests.support.payloads import H, item_payload
    from tests.support.servers import InProcessServer
    from trainer.data import load_split

    test = load_split(tiny_data, "test")
    models = tmp_path / "models"
    shutil.copytree(v1.parent, models)
    env = {
        "GRACEFUL_MODELS_DIR": str(models),
        "GRACEFUL_DATA_DIR": str(tmp_path / "data"),
        "GRACEFUL_DATABASE_URL": f"sqlite:///{tmp_path / 'gallery.db'}",
        "GRACEFUL_API_KEY": H["X-API-Key"],
        "GRACEFUL_ACTIVE_MODEL": "r18",
        "GRACEFUL_TORCH_THREADS": "1",
        "GRACEFUL_THROUGHPUT_PROBE_IMAGES": "16",
        "GRACEFUL_CHECK_SAMPLE": "0",
    }
    server = InProcessServer(env).start()
    try:
        r = server.client.post("/v1/items", json={"items": item_payload(test, range(20))}, headers=H)
        assert r.status_code == 200, r.text
        body = {"image_base64": encode_png_base64(test.images[7]), "k": 3}
        answer = server.client.post("/v1/search", json=body).json()
        assert answer["hits"][0]["external_id"] == "g7", answer  # the same image: the same embedding
    finally:
        assert server.stop() == 0
        server.close()


@backbones
def test_backbone_weights_from_a_safetensors_file(tiny_data, tmp_path, capsys):
    from timm.models import adapt_input_conv

    state = _timm_state(in_chans=3)
    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))
    # RGB weights on a gray model: the library's rule adapts the first conv; the classifier (fc) is dropped.
    model = build_model(ARCH, [0, 1], in_channels=1, backbone_weights=str(path))
    body = model.backbone.body.state_dict()
    assert torch.equal(body["conv1.weight"], adapt_input_conv(1, state["conv1.weight"]))
    assert torch.equal(body["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    assert torch.equal(body["bn1.running_var"], state["bn1.running_var"])
    assert not any(k.startswith("fc.") for k in body)

    out = tmp_path / "r18w"
    argv = [
        "train",
        "--arch",
        ARCH,
        "--backbone-weights",
        str(path),
        "--data",
        str(tiny_data),
        "--out",
        str(out),
    ]
    assert main([*argv, *FAST]) == 0
    card = load_model(out).card
    assert card.train_config["backbone_weights"] == str(path)
    assert card.train_config["backbone_weights_sha256"] == file_sha256(path)
    capsys.readouterr()


@backbones
def test_pickled_or_foreign_backbone_weights_are_refused(tiny_data, tmp_path, monkeypatch, capsys):
    state = _timm_state()

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called: a pickle must never be loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    pickle = tmp_path / "resnet18.pth"
    torch.save(state, pickle)
    with pytest.raises(ConfigError, match=r"\.pth files are pickles, which are never loaded"):
        build_model(ARCH, [0, 1], backbone_weights=str(pickle))
    disguised = tmp_path / "resnet18.safetensors"
    disguised.write_bytes(pickle.read_bytes())
    with pytest.raises(ConfigError, match="is not a safetensors file.*never loaded"):
        build_model(ARCH, [0, 1], backbone_weights=str(disguised))
    argv = ["train", "--arch", ARCH, "--backbone-weights", str(pickle), "--data", str(tiny_data)]
    assert main([*argv, "--out", str(tmp_path / "r18"), *FAST]) == 2
    assert "pickles, which are never loaded" in capsys.readouterr().err
    assert not (tmp_path / "r18").exists()

    other = tmp_path / "resnet34.safetensors"
    save_file(_timm_state(name="resnet34"), str(other))
    with pytest.raises(ConfigError, match="does not fit timm:resnet18: .*unexpected"):
        build_model(ARCH, [0, 1], backbone_weights=str(other))


@backbones
def test_library_arch_errors_are_one_clear_line(tiny_data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="timm .* has no model 'resnet1'"):
        build_model("timm:resnet1", [0, 1])
    with pytest.raises(ConfigError, match="--width shapes the presets"):
        build_model(ARCH, [0, 1], width=8)
    # A ViT made for 224x224 cannot take 28x28: said before training starts.
    with pytest.raises(ConfigError, match="timm:vit_tiny_patch16_224 does not take 1x28x28 inputs"):
        build_model("timm:vit_tiny_patch16_224", [0, 1], input_size=(28, 28))
    argv = [
        "train",
        "--arch",
        "timm:vit_tiny_patch16_224",
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "v"),
    ]
    assert main([*argv, *FAST]) == 2
    assert "does not take 1x28x28 inputs" in capsys.readouterr().err
