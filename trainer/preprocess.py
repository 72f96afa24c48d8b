"""Turning uint8 images into the float tensors a model expects, and the augmentation used in training."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocess:
    """Input contract of a model, stored in its card: channels, size in pixels, and normalisation."""

    channels: int = 1
    size: int = 28
    mean: float = 0.2860
    std: float = 0.3530

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> (B, C, H, W) float32, normalised."""
        x = torch.as_tensor(images)
        return (x.float() / 255.0 - self.mean) / self.std


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip and random shift by up to ``pad`` pixels, batch-wise. (B, C, H, W) -> same."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    # One shift per batch keeps this a cheap slice; batches are shuffled, so every image sees many shifts.
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    return padded[:, :, dy : dy + h, dx : dx + w]
