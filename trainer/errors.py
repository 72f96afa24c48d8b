"""Typed errors of the trainer package; the CLI turns them into one clear line."""

from __future__ import annotations


class TrainerError(Exception):
    """Base class of every error the trainer raises on purpose."""


class DatasetError(TrainerError):
    """A dataset is missing, malformed, or a class selection does not fit it."""


class ModelCardError(TrainerError):
    """A model folder is not a valid graceful model version (card or weights)."""


class IncompatibleModelsError(TrainerError):
    """Two models cannot be combined as asked (e.g. BCT across embedding sizes)."""


class ConfigError(TrainerError):
    """An argument or configuration value is out of range."""


class OnnxModelError(ModelCardError):
    """An ONNX file is refused as a model version (not ONNX, wrong inputs or outputs, a custom operator,
    too large, external data, or a checksum that no longer matches its card)."""


class NoImageModel(TrainerError):
    """A model version that cannot embed images: an external version, whose embeddings are computed outside
    graceful (its vectors are sent instead). ``hint`` says what to do instead (default: send vectors)."""

    def __init__(self, version: str, hint: str | None = None) -> None:
        super().__init__(
            f"version {version} is external: its embeddings are computed outside graceful, so it cannot embed "
            "images; "
            + (hint or f'send vectors, not images ({{"vector": [...], "model_version": "{version}"}})')
        )
        self.version = version


class TransformError(TrainerError):
    """A transform (old space -> new space, ``trainer.transform``) cannot be fitted, loaded or applied as asked:
    a bad kind or sample, the same or a non-plain model version, a missing or corrupt file, a wrong shape."""
