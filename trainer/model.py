"""Embedding models: a ResNet-style backbone that writes L2-normalised embeddings, and a cosine head.

The split follows timm's ``forward_features`` / ``forward_head``: ``embed(x)`` is everything up to the
embedding, ``classify(emb)`` is the head alone. BCT relies on it: a new model's embeddings are fed to the
*old* model's head, whatever the two backbones look like.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.backbones import (
    LibraryBackbone,
    check_input_size,
    check_weights_file,
    is_library_arch,
    load_body_weights,
    split_arch,
)
from trainer.errors import ConfigError


@dataclass(frozen=True)
class ArchConfig:
    """Shape of a model. ``width`` is the first stage's channels (doubling per stage), ``depth`` the
    residual blocks per stage, ``stages`` how many stages (each after the first halves the resolution).
    ``stem_stride`` 2 halves the resolution in the stem's conv instead of a max-pool after it: the same
    weights' shapes, a quarter of the stem's convolution work and no pooling pass (the edge preset's)."""

    name: str = "resnet"
    width: int = 16
    depth: int = 1
    stages: int = 3
    embedding_dim: int = 128
    num_classes: int = 10
    in_channels: int = 1
    # A soft head (scale 4, not the usual 16-30) keeps classes from collapsing to points: an old model then
    # still separates classes it never saw (v1/v1 mAP 0.615 vs 0.551 at 16 on Fashion-MNIST), which is
    # what a BCT child's queries meet in the old gallery.
    scale: float = 4.0
    stem_stride: int = 1
    # 0: ReLU. > 0: leaky ReLU with this slope for negative inputs (a preset's every activation). LQF
    # (trainer.lqf) linearises a network around its weights, and a ReLU network's Jacobian is zero wherever a
    # unit is off; the LQF paper pretrains with leaky ReLU for that reason. Left out of the card when 0, so
    # ReLU models' cards read as before.
    negative_slope: float = 0.0

    def __post_init__(self) -> None:
        for key in ("width", "depth", "stages", "embedding_dim", "num_classes", "in_channels"):
            if getattr(self, key) < 1:
                raise ConfigError(f"arch {key} must be >= 1, got {getattr(self, key)}")
        if self.scale <= 0:
            raise ConfigError(f"head scale must be > 0, got {self.scale}")
        if self.stem_stride not in (1, 2):
            raise ConfigError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        if not 0.0 <= self.negative_slope < 1.0:
            raise ConfigError(f"negative_slope must be in [0, 1), got {self.negative_slope}")
        if self.negative_slope and is_library_arch(self.name):
            raise ConfigError(
                f"--negative-slope sets the presets' activations; {self.name} has the activations its "
                "library gives it"
            )

    def to_dict(self) -> dict:
        if is_library_arch(self.name):  # a library backbone (timm:NAME): no preset shape fields
            from trainer.backbones import arch_record

            return arch_record(self)
        d = asdict(self)
        if not d["negative_slope"]:
            del d["negative_slope"]  # ReLU: the card as before the field existed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ArchConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


# Named presets; "small" is the edge model (a fraction of the default's parameters and latency).
ARCH_PRESETS: dict[str, dict] = {
    "resnet": {"width": 16, "depth": 1, "stages": 3},
    "resnet-wide": {"width": 24, "depth": 1, "stages": 3},
    "small": {"width": 8, "depth": 1, "stages": 2, "stem_stride": 2},
}


def activation(x: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """ReLU (slope 0, the very op it always was) or leaky ReLU (ArchConfig.negative_slope)."""
    return F.leaky_relu(x, negative_slope) if negative_slope else F.relu(x)


class _Activation(nn.Module):
    """``activation`` as a module (the stem's Sequential)."""

    def __init__(self, negative_slope: float) -> None:
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation(x, self.negative_slope)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, negative_slope: float = 0.0) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = activation(self.bn1(self.conv1(x)), self.negative_slope)
        y = self.bn2(self.conv2(y))
        return activation(y + self.shortcut(x), self.negative_slope)


class Backbone(nn.Module):
    """(B, C, H, W) float images -> (B, D) L2-normalised embeddings."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        # The stem halves the resolution once: at 28x28 this keeps a CPU training step cheap without hurting
        # accuracy much. Max-pool after a full-resolution conv by default; a stride-2 conv for the edge preset
        # (the full-resolution conv and the pool dominate a small model's time).
        down: list[nn.Module] = [nn.MaxPool2d(2)] if cfg.stem_stride == 1 else []
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.width, 3, cfg.stem_stride, 1, bias=False),
            nn.BatchNorm2d(cfg.width),
            # nn.ReLU for ReLU: the same module (and state-dict keys, none) as before the option existed
            _Activation(cfg.negative_slope) if cfg.negative_slope else nn.ReLU(),
            *down,
        )
        blocks: list[nn.Module] = []
        cin = cfg.width
        for s in range(cfg.stages):
            cout = cfg.width * 2**s
            for d in range(cfg.depth):
                blocks.append(BasicBlock(cin, cout, 2 if (s > 0 and d == 0) else 1, cfg.negative_slope))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Linear(cin, cfg.embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))  # (B, C', H', W')
        h = h.mean(dim=(2, 3))  # (B, C')
        return F.normalize(self.proj(h), dim=1)  # (B, D), unit norm


class CosineHead(nn.Module):
    """Cosine-softmax classifier: logits = scale * cos(emb, w_c). (B, D) -> (B, K)."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)
        self.scale = scale

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(emb, dim=1) @ F.normalize(self.weight, dim=1).T


class EmbeddingModel(nn.Module):
    """Backbone + head. ``classes[i]`` is the dataset label that head row ``i`` predicts."""

    def __init__(self, cfg: ArchConfig, classes: list[int]) -> None:
        super().__init__()
        if len(classes) != cfg.num_classes:
            raise ConfigError(f"{len(classes)} classes for a head of {cfg.num_classes} rows")
        self.cfg = cfg
        self.classes = list(classes)
        # A preset's ResNet, or a library's network (trainer.backbones, "timm:NAME"): the same (B, D) contract.
        self.backbone: nn.Module = (
            LibraryBackbone(cfg.name, cfg.in_channels, cfg.embedding_dim)
            if is_library_arch(cfg.name)
            else Backbone(cfg)
        )
        self.head = CosineHead(cfg.embedding_dim, cfg.num_classes, cfg.scale)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised floats -> (B, D) unit-norm embeddings."""
        return self.backbone(x)

    def classify(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings -> (B, K) logits over ``self.classes``."""
        return self.head(emb)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(x)
        return emb, self.classify(emb)

    def label_to_row(self, labels: torch.Tensor) -> torch.Tensor:
        """Map dataset labels (B,) to head rows (B,); -1 for labels this head does not know."""
        lut = torch.full(
            (max(max(self.classes), int(labels.max()) if labels.numel() else 0) + 1,),
            -1,
            dtype=torch.long,
            device=labels.device,
        )
        lut[torch.as_tensor(self.classes, device=labels.device)] = torch.arange(
            len(self.classes), device=labels.device
        )
        return lut[labels]


def build_model(
    arch: str,
    classes: list[int],
    *,
    backbone_weights: str | None = None,
    input_size: tuple[int, int] | None = None,
    **overrides: object,
) -> EmbeddingModel:
    """A fresh model from a preset name plus overrides (width, depth, embedding_dim, scale ...), or from a
    library backbone ("timm:resnet18"; optionally initialised from ``backbone_weights``, a safetensors file,
    and checked to take ``input_size`` (height, width)): trainer.backbones."""
    if is_library_arch(arch):
        return _build_library_model(arch, classes, backbone_weights, input_size, **overrides)
    if backbone_weights is not None:
        raise ConfigError(
            f"--backbone-weights initialises a library backbone (--arch timm:NAME); preset {arch!r} trains "
            "from random weights"
        )
    if arch not in ARCH_PRESETS:
        raise ConfigError(
            f"unknown arch {arch!r}: choose one of {', '.join(ARCH_PRESETS)}, or a library backbone "
            "timm:NAME (e.g. timm:resnet18)"
        )
    params = {**ARCH_PRESETS[arch], **{k: v for k, v in overrides.items() if v is not None}}
    cfg = ArchConfig(name=arch, num_classes=len(classes), **params)  # type: ignore[arg-type]
    return EmbeddingModel(cfg, classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Preset shape fields: a library backbone has the shape its library gives it.
_PRESET_SHAPE = ("width", "depth", "stages", "stem_stride")


def _build_library_model(
    arch: str,
    classes: list[int],
    weights: str | os.PathLike[str] | None = None,
    input_size: tuple[int, int] | None = None,
    **overrides: object,
) -> EmbeddingModel:
    """A fresh EmbeddingModel around a library backbone: random init, or the body from ``weights``."""
    split_arch(arch)
    shaped = [k for k in _PRESET_SHAPE if overrides.get(k) is not None]
    if shaped:
        flag = shaped[0].replace("_", "-")
        raise ConfigError(f"--{flag} shapes the presets; {arch} has the shape its library gives it")
    params = {k: v for k, v in overrides.items() if v is not None}
    if weights is not None:
        check_weights_file(weights)  # before the library is asked for anything
    cfg = ArchConfig(name=arch, num_classes=len(classes), **params)  # type: ignore[arg-type]
    model = EmbeddingModel(cfg, classes)
    if weights is not None:
        load_body_weights(model.backbone, weights)  # type: ignore[arg-type]
    if input_size is not None:
        check_input_size(model.backbone, cfg.in_channels, *input_size)  # type: ignore[arg-type]
    return model
