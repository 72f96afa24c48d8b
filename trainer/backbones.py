"""Backbones from a model library (timm): ``--arch timm:resnet18``.

The library builds the network without its classifier (``timm.create_model(name, pretrained=False,
num_classes=0, in_chans=C)``: images -> pooled features); graceful adds what every preset has, a linear
projection to the card's embedding size and L2 normalisation, and keeps its own cosine head
(trainer.model.EmbeddingModel). So ``embed``/``classify`` split the same way as for a preset, and BCT, PC,
eval, adapters and the service treat a library backbone like one.

A card records ``arch.name`` ("timm:resnet18") with the embedding size, classes, input channels and head scale:
all a rebuild needs (the trained weights are the version's own ``weights.safetensors``). It also records the
library's version, for the reader. The initial weights are random, or the library model's own state dict from
a local safetensors file (``--backbone-weights``; never a pickle); its checksum goes in the card's
train_config.

The library is imported here only, and only when such an arch is built: graceful imports without it. It is
the optional extra ``backbones`` (pyproject.toml): timm needs torchvision, which must match torch exactly;
``scripts/install-backbones.sh`` builds a venv with a torch/torchvision pair that does (README, "Library
backbones").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import ConfigError

LIBRARIES = ("timm",)
# Prefixes people may try that name another library; said so plainly rather than "unknown arch".
_OTHER_LIBRARIES = {
    "torchvision": "torchvision's models are not wired in: timm has the same families (timm:resnet18, "
    "timm:mobilenetv3_small_100, timm:efficientnet_b0, ...) and takes any input channels",
}
EXTRA_HINT = (
    "install the optional extra 'backbones' (pip install -e '.[backbones]' beside a torch that torchvision "
    "matches; `bash scripts/install-backbones.sh` builds .venv-backbones with torch 2.14.1, torchvision 0.29.1 "
    "and timm)"
)
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar", ".npz"}


class BackboneLibraryMissing(ConfigError):
    """The arch names a model library that is not installed (or does not import) here."""


def is_library_arch(name: str) -> bool:
    """True for "library:model" names (``timm:resnet18``); presets have no colon."""
    return ":" in name


def split_arch(name: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ("timm", "resnet18"); ConfigError for another library or an empty model."""
    library, _, model = name.partition(":")
    if library in _OTHER_LIBRARIES:
        raise ConfigError(f"arch {name!r}: {_OTHER_LIBRARIES[library]}")
    if library not in LIBRARIES:
        raise ConfigError(
            f"arch {name!r}: unknown model library {library!r} (graceful takes {', '.join(LIBRARIES)})"
        )
    if not model:
        raise ConfigError(f"arch {name!r} names no model: e.g. timm:resnet18")
    return library, model


def _import_timm(name: str):
    try:
        import timm
    except ImportError as e:  # timm itself, or torchvision under it, is not installed
        raise BackboneLibraryMissing(
            f"{name} needs the model library timm, which is not installed here ({e}): {EXTRA_HINT}"
        ) from None
    except Exception as e:  # installed but broken, e.g. a torchvision built for another torch
        raise BackboneLibraryMissing(
            f"{name} needs the model library timm, which does not import here "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; torchvision must be the build "
            f"for this torch {torch.__version__}): {EXTRA_HINT}"
        ) from None
    return timm


def library_version(library: str) -> str | None:
    """The installed version of a library (no import), None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(library)
    except PackageNotFoundError:
        return None


def create_body(name: str, in_channels: int) -> nn.Module:
    """The library's network for ``name`` without its classifier: (B, C, H, W) -> (B, num_features)."""
    _, model = split_arch(name)
    timm = _import_timm(name)
    if not timm.is_model(model):
        close = timm.list_models(f"*{model[:4]}*")[:8] if len(model) >= 2 else []
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"arch {name!r}: timm {timm.__version__} has no model {model!r}{hint}")
    # pretrained=False: never a download; initial weights come only from a local file (load_body_weights).
    return timm.create_model(model, pretrained=False, num_classes=0, in_chans=in_channels)


class LibraryBackbone(nn.Module):
    """(B, C, H, W) float images -> (B, D) L2-normalised embeddings: the library's body, pooled features
    projected to the embedding size (as the presets' ``Backbone``)."""

    def __init__(self, name: str, in_channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.body = create_body(name, in_channels)
        self.proj = nn.Linear(int(self.body.num_features), embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (B, F): pooled features (num_classes=0)
        return F.normalize(self.proj(h.flatten(1)), dim=1)  # (B, D), unit norm


def arch_record(cfg: Any) -> dict[str, Any]:
    """The card's ``arch`` for a library backbone: what a rebuild needs (name, channels, embedding size,
    classes, head scale), plus the library and its version for the reader. The presets' shape fields (width,
    depth, stages) mean nothing here and are left out."""
    library, _ = split_arch(cfg.name)
    return {
        "name": cfg.name,
        "embedding_dim": cfg.embedding_dim,
        "num_classes": cfg.num_classes,
        "in_channels": cfg.in_channels,
        "scale": cfg.scale,
        "library": library,
        "library_version": library_version(library),
    }


def check_weights_file(path: str | os.PathLike[str]) -> Path:
    """A backbone weights file must be a regular safetensors file; a pickle is refused by name and content."""
    p = Path(path)
    if p.suffix.lower() in _PICKLE_SUFFIXES:
        raise ConfigError(
            f"--backbone-weights {p}: {p.suffix} files are pickles, which are never loaded (they can run code): "
            "convert it to safetensors (safetensors.torch.save_file(state_dict, 'weights.safetensors'))"
        )
    if p.suffix.lower() != ".safetensors":
        raise ConfigError(f"--backbone-weights {p}: expected a .safetensors file")
    if not p.is_file():
        raise ConfigError(f"--backbone-weights {p}: no such file")
    return p


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (ConfigError for anything else, e.g. a pickle renamed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = check_weights_file(path)
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(
            f"--backbone-weights {p} is not a safetensors file ({e}); pickled weights are never loaded"
        ) from None


def load_body_weights(backbone: LibraryBackbone, path: str | os.PathLike[str]) -> dict[str, int]:
    """Initialise the library body from a local file holding the library model's state dict (as the
    library names its tensors, e.g. timm's ``model.safetensors``). Its classifier's tensors are dropped (the
    body has none) and a first conv made for other input channels is adapted by the library's own rule
    (``adapt_input_conv``: RGB weights summed for one channel). Every body tensor must be there, and nothing
    else. Returns counts for the log."""
    from timm.models import adapt_input_conv

    state = read_weights(path)
    cfg = getattr(backbone.body, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])
    dropped = [k for k in state if any(k == h or k.startswith(h + ".") for h in heads)]
    state = {k: v for k, v in state.items() if k not in dropped}
    own = backbone.body.state_dict()
    first = cfg.get("first_conv")
    firsts = [first] if isinstance(first, str) else list(first or [])
    adapted = 0
    for conv in firsts:
        key = f"{conv}.weight"
        if key in state and key in own and state[key].shape != own[key].shape and state[key].dim() == 4:
            state[key] = adapt_input_conv(own[key].shape[1], state[key])
            adapted += 1
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"--backbone-weights {path} does not fit {backbone_name(backbone)}: "
            + (f"missing {len(missing)} tensors ({', '.join(missing[:3])}...)" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}...)" if unexpected else "")
        )
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        raise ConfigError(
            f"--backbone-weights {path} does not fit {backbone_name(backbone)}: {k} is "
            f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        )
    backbone.body.load_state_dict(state, strict=True)
    return {"tensors": len(state), "classifier_dropped": len(dropped), "first_conv_adapted": adapted}


def backbone_name(backbone: LibraryBackbone) -> str:
    cfg = getattr(backbone.body, "pretrained_cfg", None) or {}
    return f"timm:{cfg.get('architecture', type(backbone.body).__name__)}"


def check_input_size(backbone: LibraryBackbone, channels: int, height: int, width: int) -> None:
    """One forward pass on a blank image of the training contract, so a network that cannot take that size
    (a ViT built for 224x224, a deep net on tiny images) fails here with its reason, not mid-training."""
    was = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, channels, height, width))
    except Exception as e:
        raise ConfigError(
            f"{backbone_name(backbone)} does not take {channels}x{height}x{width} inputs "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}): choose --size or another model"
        ) from None
    finally:
        backbone.train(was)
