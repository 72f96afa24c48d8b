"""Verifying a model folder's weights against its card, without loading them (part of the model format).

A folder is registered (listed as valid, its version written to the catalog) only if its weights file is a
regular file inside the folder, is safetensors (its header parses), matches the checksum its card states,
and, for a plain model, holds exactly the tensors, with the shapes, of the architecture its card describes.
Weights that fail any of these are refused when the folder is read, not when someone tries to activate it,
and no tensor data is read (only the header and the bytes for the checksum).
"""

from __future__ import annotations

from pathlib import Path

from trainer.artifact import ModelCard, file_sha256
from trainer.errors import ModelCardError


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelCardError(
            f"{path.name} is not a safetensors file ({e}); pickled weights are never loaded"
        ) from None


def _expected_shapes(card: ModelCard) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the card's architecture (built on the meta device: no memory, no data)."""
    import torch

    from trainer.model import ArchConfig, EmbeddingModel

    with torch.device("meta"):
        model = EmbeddingModel(ArchConfig.from_dict(card.arch), list(card.classes))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def verify_weights(folder: Path, card: ModelCard) -> None:
    """Raise :class:`ModelCardError` saying why ``folder``'s weights do not belong to ``card``."""
    if card.external:
        return  # an external version has no weights: its embeddings are computed outside graceful
    weights = folder / card.weights
    if weights.is_symlink() or not weights.is_file():
        raise ModelCardError(f"{folder.name} has no regular weights file {card.weights} (links are refused)")
    if weights.resolve().parent != folder.resolve():
        raise ModelCardError(f"{weights} lies outside its model folder: refused")
    if not card.weights_sha256:
        raise ModelCardError(
            f"the card of {folder.name} states no weights_sha256: its weights cannot be verified"
        )
    if file_sha256(weights) != card.weights_sha256:
        raise ModelCardError(
            f"{weights.name} in {folder.name} does not match the checksum in its card "
            "(corrupt or replaced): refused"
        )
    shapes = _header_shapes(weights)
    if card.adapter_of is not None:
        return  # an adapter's tensors are checked against its base model when it is loaded
    if card.format == "onnx":
        return _verify_onnx(folder, card, shapes)
    try:
        expected = _expected_shapes(card)
    except Exception as e:  # a card whose arch cannot be built
        raise ModelCardError(f"the card of {folder.name} describes no buildable architecture: {e}") from None
    if shapes != expected:
        missing = sorted(set(expected) - set(shapes))[:3]
        extra = sorted(set(shapes) - set(expected))[:3]
        wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])[:3]
        raise ModelCardError(
            f"{weights.name} in {folder.name} does not fit the architecture in its card "
            f"(missing {missing}, unexpected {extra}, other shapes {wrong}): refused"
        )


def _verify_onnx(folder: Path, card: ModelCard, shapes: dict[str, tuple[int, ...]]) -> None:
    """An ONNX version: its head file holds the (K, D) rows, and its graph passes the structural checks
    (checksum, size, one image input of the card's contract, standard operators, no external data)."""
    from trainer.onnx_model import HEAD_TENSOR, verify_onnx

    expected = {HEAD_TENSOR: (len(card.classes), card.embedding_dim)}
    if shapes != expected:
        raise ModelCardError(
            f"{card.weights} in {folder.name} holds {shapes}, expected {expected} (the ONNX version's head): refused"
        )
    verify_onnx(folder, card)
