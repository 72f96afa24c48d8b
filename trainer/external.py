"""External model versions: a folder with a card and no weights, for embeddings computed outside graceful.

A team whose embeddings come from its own pipeline (a GPU job, another service) registers the model that
makes them as an *external version*: ``card.json`` with ``format: "external"``, its ``embedding_dim``, the
``space`` it writes into and ``compatible_with``. The service then takes that version's vectors, not images,
for ingest and search (``{"vector": [...], "model_version": ...}``); asking it to embed an image raises
:class:`~trainer.errors.NoImageModel`. ``graceful register-external`` writes such a folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.artifact import (
    CARD_FILE,
    EXTERNAL_FORMAT,
    ModelCard,
    check_version_name,
    read_card,
    write_card,
)
from trainer.errors import ConfigError, ModelCardError, TrainerError

MAX_EXTERNAL_DIM = 65536  # a JSON ingest of 1024 such vectors is already past the default 32 MiB body bound


def _name(value: str, flag: str) -> str:
    """``value`` if it can name a space or version (the rule of version names), else :class:`ConfigError`."""
    try:
        return check_version_name(value)
    except ModelCardError:
        raise ConfigError(
            f"{flag} {value!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        ) from None


def register_external(
    out: str | Path,
    dim: int,
    space: str | None = None,
    compatible_with: str | None = None,
    classes: Sequence[int] = (),
) -> ModelCard:
    """Write the external version folder ``out`` (its name is the version) and return its card.

    ``space`` defaults to the version itself (it founds its own space); pass the gallery's space (and the
    version it is compatible with) for a model whose vectors are comparable with that gallery's.
    Raises :class:`ModelCardError` for a bad name, :class:`ConfigError` for a dimension out of
    1-``MAX_EXTERNAL_DIM`` or a folder that already holds a model version."""
    folder = Path(out)
    version = check_version_name(folder.name)
    if not 1 <= int(dim) <= MAX_EXTERNAL_DIM:
        raise ConfigError(f"--dim must be 1-{MAX_EXTERNAL_DIM}, got {dim}")
    if (folder / CARD_FILE).exists():
        raise ConfigError(
            f"{folder} already holds a model version ({CARD_FILE}): remove it or pick another --out"
        )
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} exists and is not a folder")
    card = ModelCard(
        format=EXTERNAL_FORMAT,
        version=version,
        embedding_dim=int(dim),
        space=_name(space, "--space") if space is not None else version,
        compatible_with=_name(compatible_with, "--compatible-with") if compatible_with is not None else None,
        classes=list(classes),
    )
    folder.mkdir(parents=True, exist_ok=True)
    # no weights, no input contract (it takes no images), no network: those fields are left out
    write_card(folder, card, exclude={"weights", "weights_sha256", "preprocess", "train_config", "arch"})
    return read_card(folder)  # as the service will read it


def register_external_parser(prog: str = "graceful register-external") -> argparse.ArgumentParser:
    from trainer.cli import _Parser

    p = _Parser(
        prog=prog,
        description="Write a model version folder for embeddings computed outside graceful (a card, no "
        "weights): the service then takes that version's vectors, not images.",
    )
    p.add_argument("--out", required=True, help="model version folder to write (its name is the version)")
    p.add_argument("--dim", required=True, type=int, help="length of the vectors the model writes")
    p.add_argument("--space", default=None, help="embedding space it writes into (default: its own version)")
    p.add_argument(
        "--compatible-with", default=None, help="the version whose space it was made compatible with"
    )
    p.add_argument("--classes", default=None, help="classes it knows, e.g. 0-4 (optional)")
    return p


def register_external_main(argv: Sequence[str] | None = None) -> int:
    from trainer.data import parse_classes

    try:
        args = register_external_parser().parse_args(argv)
        classes = parse_classes(args.classes) if args.classes is not None else []
        card = register_external(args.out, args.dim, args.space, args.compatible_with, classes)
    except TrainerError as e:
        print(f"graceful: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote external version {card.version} to {args.out} ({card.embedding_dim}-d, space {card.space}, "
        f"compatible_with {card.compatible_with}): ingest and search it with vectors"
    )
    return 0
