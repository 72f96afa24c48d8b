"""A model version on disk: ``<dir>/card.json`` + ``<dir>/weights.safetensors``.

Loading never executes code from the folder: weights are safetensors only (a pickle is refused), the card is
validated field by field, and the weights' checksum and tensor names must match what the card describes.

An *adapter version* (card with ``adapter_of``) holds only an adapter's weights; it is served as "the new model
it adapts, then the adapter", so loading it also loads the new model's folder, a sibling in the same models
dir named by ``adapter_of`` (and, if the card pins it, with the same weights checksum as when it was fitted).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.adapter import AdaptedModel, AdapterConfig, EmbeddingAdapter
from trainer.backbones import BackboneLibraryMissing
from trainer.errors import ModelCardError, NoImageModel
from trainer.model import ArchConfig, CosineHead, EmbeddingModel
from trainer.preprocess import Preprocess

CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"
CARD_FORMAT = "graceful-model/1"
EXTERNAL_FORMAT = "external"  # no weights: the version's embeddings are computed outside graceful
ONNX_FORMAT = "onnx"  # an ONNX export run by onnxruntime, with a head file (trainer/onnx_model.py)
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"}
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def check_version_name(name: str) -> str:
    """A version (the folder name) is 1-128 of letters, digits, '.', '_', '-', starting alphanumeric."""
    import re

    if not (1 <= len(name) <= 128 and re.match(NAME_PATTERN, name)):
        raise ModelCardError(
            f"bad model version name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it is the output folder's name)"
        )
    return name


class ModelCard(BaseModel):
    """What a model version says about itself (docs/architecture.md, "Contracts")."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: str = CARD_FORMAT
    version: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)
    arch: dict[str, Any] = Field(default_factory=dict)  # required unless external (see _external_rules)
    embedding_dim: int = Field(gt=0)
    classes: list[int] = Field(default_factory=list)  # required unless external
    class_names: list[str] = Field(default_factory=list)
    space: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)
    compatible_with: str | None
    adapter_of: str | None = Field(default=None, min_length=1, max_length=128, pattern=NAME_PATTERN)
    adapter_of_sha256: str | None = None  # the new model's weights checksum when the adapter was fitted
    preprocess: dict[str, Any] = Field(default_factory=lambda: Preprocess().to_dict())
    train_config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    weights: str = WEIGHTS_FILE
    weights_sha256: str | None = None
    onnx_file: str | None = None  # format onnx: the export's file name in the folder, and its checksum
    onnx_sha256: str | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in (CARD_FORMAT, EXTERNAL_FORMAT, ONNX_FORMAT):
            raise ValueError(
                f"unknown card format {v!r} (this graceful reads {CARD_FORMAT!r}, {EXTERNAL_FORMAT!r}, "
                f"{ONNX_FORMAT!r})"
            )
        return v

    @model_validator(mode="after")
    def _external_rules(self) -> ModelCard:
        # Only an external version may leave out arch and classes: it has no network (classes stay optional,
        # for the check's old/new split); it cannot be an adapter (an adapter maps a network's embeddings).
        if self.external:
            if self.adapter_of is not None:
                raise ValueError("an external version cannot be an adapter (adapter_of)")
        else:
            missing = [f for f in ("arch", "classes") if not getattr(self, f)]
            if missing:
                raise ValueError(
                    f"{' and '.join(missing)} required (only an external version may leave them out)"
                )
        return self

    @property
    def external(self) -> bool:
        """Whether this version's embeddings are computed outside graceful (no weights, no image model)."""
        return self.format == EXTERNAL_FORMAT

    @field_validator("onnx_file")
    @classmethod
    def _plain_onnx_name(cls, v: str | None) -> str | None:
        # Like the weights: a plain file name inside the folder, so a card cannot point outside it.
        if v is not None and (Path(v).name != v or not v.endswith(".onnx")):
            raise ValueError(f"onnx_file must be a .onnx file name inside the folder, got {v!r}")
        return v

    @field_validator("weights")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # The weights file must sit in the model folder: no paths, so a card cannot point outside it.
        if Path(v).name != v or not v.endswith(".safetensors"):
            raise ValueError(f"weights must be a .safetensors file name inside the folder, got {v!r}")
        return v


class ExternalModel:
    """The model of an external version: it has none. Its embeddings are computed outside graceful and sent
    as vectors; asking it to embed (or classify) raises :class:`NoImageModel`."""

    def __init__(self, version: str) -> None:
        self.version = version

    def embed(self, *_: object) -> torch.Tensor:
        raise NoImageModel(self.version)

    classify = embed

    @property
    def head(self) -> NoReturn:  # no classifier either
        raise NoImageModel(self.version)

    def eval(self) -> ExternalModel:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> ExternalModel:
        return self


@dataclass
class LoadedModel:
    """A model ready to embed: eval mode, no gradients, with its card and input contract."""

    card: ModelCard
    model: EmbeddingModel | AdaptedModel | ExternalModel
    path: Path

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.card.preprocess)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(
    folder: str | os.PathLike[str], model: EmbeddingModel | AdaptedModel, card: ModelCard
) -> ModelCard:
    """Write weights then card (card last, atomically: a folder with a card is complete). Returns the card.

    For an ``AdaptedModel`` only the adapter's own tensors are written (the new model stays in its folder).
    """
    from safetensors.torch import save_file

    if isinstance(model, AdaptedModel) != (card.adapter_of is not None):
        raise ModelCardError("an adapted model needs a card with adapter_of, and only it may have one")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / card.weights
    tmp = weights.with_suffix(".tmp")
    raw = model.own_state() if isinstance(model, AdaptedModel) else model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in raw.items()}
    save_file(state, str(tmp), metadata={"format": CARD_FORMAT})
    os.replace(tmp, weights)
    card = card.model_copy(update={"weights_sha256": file_sha256(weights)})
    write_card(folder, card)
    return card


def write_card(folder: Path, card: ModelCard, exclude: set[str] | None = None) -> None:
    """Write ``card.json`` atomically (a folder with a card is complete); ``exclude``: fields left out."""
    tmp_card = folder / (CARD_FILE + ".tmp")
    tmp_card.write_text(json.dumps(card.model_dump(mode="json", exclude=exclude), indent=2) + "\n")
    os.replace(tmp_card, folder / CARD_FILE)


def read_card(folder: str | os.PathLike[str]) -> ModelCard:
    """Read and validate ``card.json`` of a model folder (no weights are touched)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelCardError(f"model folder {folder} does not exist")
    path = folder / CARD_FILE
    if not path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
        raise ModelCardError(f"{folder} has no {CARD_FILE}{hint}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelCardError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ModelCardError(f"{path} must hold a JSON object")
    try:
        card = ModelCard.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'card'}: {err['msg']}" for err in e.errors()
        )
        raise ModelCardError(f"{path} is not a valid model card: {problems}") from None
    if card.version != folder.name:
        raise ModelCardError(f"{path} says version {card.version!r} but the folder is named {folder.name!r}")
    if not card.external and card.embedding_dim != int(card.arch.get("embedding_dim", -1)):
        raise ModelCardError(
            f"{path}: embedding_dim {card.embedding_dim} differs from arch {card.arch.get('embedding_dim')}"
        )
    return card


def adapter_base_folder(folder: str | os.PathLike[str], card: ModelCard) -> Path:
    """The folder of the new model an adapter version adapts: ``<models dir>/<adapter_of>``, a real folder
    (not a link) next to the adapter's. Raises ``ModelCardError`` saying what is missing."""
    assert card.adapter_of is not None
    folder = Path(folder)
    base = folder.parent / card.adapter_of
    if card.adapter_of == card.version:
        raise ModelCardError(f"adapter {card.version} names itself as adapter_of")
    if not base.is_dir():
        raise ModelCardError(
            f"adapter {card.version} maps the embeddings of model {card.adapter_of!r} "
            f"(adapter_of), whose folder {base} is missing: put that model version next to it"
        )
    if base.is_symlink() or base.resolve().parent != folder.resolve().parent:
        raise ModelCardError(f"adapter {card.version}: {base} must be a real folder next to it, not a link")
    return base


def _load_state(folder: Path, card: ModelCard) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = folder / card.weights
    if not weights.is_file():
        raise ModelCardError(f"{folder} has no weights file {card.weights}")
    if weights.is_symlink() or weights.resolve().parent != folder.resolve():
        raise ModelCardError(f"{weights} must be a regular file inside {folder}, not a link")
    if card.weights_sha256 and file_sha256(weights) != card.weights_sha256:
        raise ModelCardError(f"{weights} does not match the checksum in its card (corrupt or replaced)")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelCardError(
            f"{weights} is not a safetensors file ({e}); pickled weights are never loaded"
        ) from None


def load_model(folder: str | os.PathLike[str]) -> LoadedModel:
    """Validate and load a model version (or an adapter version, with the new model it adapts); raises
    ``ModelCardError`` with the reason on anything odd."""
    folder = Path(folder)
    card = read_card(folder)
    if card.external:
        return LoadedModel(card=card, model=ExternalModel(card.version), path=folder)
    if card.adapter_of is not None:
        return _load_adapter(folder, card)
    if card.format == ONNX_FORMAT:
        return _load_onnx(folder, card)
    weights = folder / card.weights
    state = _load_state(folder, card)
    try:
        arch = ArchConfig.from_dict(card.arch)
        model = EmbeddingModel(arch, list(card.classes))
        model.load_state_dict(state, strict=True)
    except BackboneLibraryMissing as e:  # a library backbone (timm:NAME) without its library here
        raise ModelCardError(f"model {card.version}: {e}") from None
    except Exception as e:  # a shape or key mismatch: the weights do not belong to this card
        raise ModelCardError(
            f"{weights} does not fit the architecture in its card: {str(e).splitlines()[0]}"
        ) from None
    model.eval().requires_grad_(False)
    return LoadedModel(card=card, model=model, path=folder)


def _load_onnx(folder: Path, card: ModelCard) -> LoadedModel:
    """An ONNX version: the head rows (safetensors, checksummed), then the graph, checked and test-run."""
    from trainer.onnx_model import load_onnx_model

    return LoadedModel(card=card, model=load_onnx_model(folder, card, _load_state(folder, card)), path=folder)


def _load_adapter(folder: Path, card: ModelCard) -> LoadedModel:
    base_dir = adapter_base_folder(folder, card)
    base = read_card(base_dir)
    if base.adapter_of is not None:
        raise ModelCardError(
            f"adapter {card.version} adapts {base.version}, itself an adapter: chains are not served"
        )
    if card.adapter_of_sha256 and base.weights_sha256 != card.adapter_of_sha256:
        raise ModelCardError(
            f"adapter {card.version} was fitted to other weights of {base.version} than those in "
            f"{base_dir} (checksum differs): refit it"
        )
    if Preprocess.from_dict(base.preprocess) != Preprocess.from_dict(card.preprocess):
        raise ModelCardError(f"adapter {card.version}: its input contract differs from {base.version}'s")
    new = load_model(base_dir)
    state = _load_state(folder, card)
    weights = folder / card.weights
    try:
        cfg = AdapterConfig.from_dict(card.arch)
        if cfg.in_dim != new.card.embedding_dim:
            raise ValueError(
                f"adapter input {cfg.in_dim}-d, {base.version} writes {new.card.embedding_dim}-d"
            )
        head = CosineHead(cfg.embedding_dim, len(card.classes), cfg.scale)
        model = AdaptedModel(new.model, EmbeddingAdapter(cfg), head, list(card.classes))  # type: ignore[arg-type]
        own = {
            **{f"adapter.{k}": v for k, v in model.adapter.state_dict().items()},
            "head.weight": head.weight,
        }
        if set(state) != set(own):
            raise ValueError(f"tensors {sorted(state)}, expected {sorted(own)}")
        model.adapter.load_state_dict(
            {k[len("adapter.") :]: v for k, v in state.items() if k.startswith("adapter.")}
        )
        head.load_state_dict({"weight": state["head.weight"]})
        model.fuse()  # a procrustes adapter costs nothing per query once folded into the new model
    except Exception as e:  # a shape or key mismatch, or a bad arch: the weights do not belong to this card
        raise ModelCardError(
            f"{weights} does not fit the adapter in its card: {str(e).splitlines()[0]}"
        ) from None
    model.eval().requires_grad_(False)
    return LoadedModel(card=card, model=model, path=folder)


def embed_images(loaded: LoadedModel, images, batch_size: int = 1024):
    """(N, C, H, W) uint8 -> (N, D) float32 unit-norm embeddings of a loaded model."""
    import numpy as np

    prep, out = loaded.preprocess, []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out.append(loaded.model.embed(prep(images[i : i + batch_size])).numpy())
    return np.concatenate(out) if out else np.zeros((0, loaded.card.embedding_dim), np.float32)


def predict_labels(loaded: LoadedModel, embeddings):
    """(N, D) embeddings -> (N,) predicted dataset labels from the model's own head."""
    import numpy as np

    with torch.inference_mode():
        rows = loaded.model.classify(torch.from_numpy(embeddings)).argmax(1).numpy()
    return np.asarray(loaded.card.classes, dtype=np.int64)[rows]


def random_twin(loaded: LoadedModel, seed: int = 0) -> LoadedModel | None:
    """A model of ``loaded``'s architecture and input contract with seeded random weights: the
    no-information baseline a compatibility measurement is read against. None for an adapter version
    (its architecture is two models) and an external one (it has none)."""
    if loaded.card.adapter_of is not None or loaded.card.external or loaded.card.format == ONNX_FORMAT:
        return None  # an ONNX graph's weights are not ours to randomise
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EmbeddingModel(ArchConfig.from_dict(loaded.card.arch), list(loaded.card.classes))
    model.eval().requires_grad_(False)
    card = loaded.card.model_copy(update={"version": f"{loaded.card.version}-random"})
    return LoadedModel(card=card, model=model, path=loaded.path)
