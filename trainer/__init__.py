"""trainer: data, models, losses, training and evaluation, and the model format.

What the server may use is declared here (``__all__``): the model format (cards, loading, embedding a
batch, verifying a folder's weights) and its errors. Names are imported lazily (PEP 562) so ``import
trainer`` stays cheap: torch is loaded only when a name that needs it is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LoadedModel": "trainer.artifact",
    "ModelCard": "trainer.artifact",
    "adapter_base_folder": "trainer.artifact",
    "embed_images": "trainer.artifact",
    "file_sha256": "trainer.artifact",
    "load_model": "trainer.artifact",
    "random_twin": "trainer.artifact",
    "read_card": "trainer.artifact",
    "ModelCardError": "trainer.errors",
    "NoImageModel": "trainer.errors",
    "Preprocess": "trainer.preprocess",
    "ROTATING_ORIENTATIONS": "trainer.preprocess",
    "eight_bit": "trainer.preprocess",
    "exif_orientation": "trainer.preprocess",
    "upright": "trainer.preprocess",
    "relevance_metrics": "trainer.metrics",
    "retrieval_flips": "trainer.metrics",
    "verify_weights": "trainer.verify",
    "TransformError": "trainer.errors",
    "TRANSFORMS_DIR": "trainer.transform",
    "TransformCard": "trainer.transform",
    "TransformConfig": "trainer.transform",
    "TransformResult": "trainer.transform",
    "VectorTransform": "trainer.transform",
    "fit_transform": "trainer.transform",
    "list_transforms": "trainer.transform",
    "load_transform": "trainer.transform",
    "transform_dir": "trainer.transform",
}
__all__ = [
    "LoadedModel",
    "ModelCard",
    "ModelCardError",
    "NoImageModel",
    "Preprocess",
    "ROTATING_ORIENTATIONS",
    "eight_bit",
    "exif_orientation",
    "upright",
    "adapter_base_folder",
    "embed_images",
    "file_sha256",
    "load_model",
    "random_twin",
    "read_card",
    "relevance_metrics",
    "retrieval_flips",
    "verify_weights",
    "TransformError",
    "TRANSFORMS_DIR",
    "TransformCard",
    "TransformConfig",
    "TransformResult",
    "VectorTransform",
    "fit_transform",
    "list_transforms",
    "load_transform",
    "transform_dir",
]

if TYPE_CHECKING:
    from trainer.artifact import (
        LoadedModel,
        ModelCard,
        adapter_base_folder,
        embed_images,
        file_sha256,
        load_model,
        random_twin,
        read_card,
    )
    from trainer.errors import ModelCardError, NoImageModel, TransformError
    from trainer.metrics import relevance_metrics, retrieval_flips
    from trainer.preprocess import ROTATING_ORIENTATIONS, Preprocess, eight_bit, exif_orientation, upright
    from trainer.transform import (
        TRANSFORMS_DIR,
        TransformCard,
        TransformConfig,
        TransformResult,
        VectorTransform,
        fit_transform,
        list_transforms,
        load_transform,
        transform_dir,
    )
    from trainer.verify import verify_weights


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
