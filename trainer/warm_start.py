"""Warm start: a new model that begins as the old one, so a BCT update is a small step from the old weights.

A model trained from scratch embeds images of classes neither model saw wherever its own training leaves
them; one that starts from the old weights starts out embedding every image exactly where the old gallery
expects it, and the BCT terms then only have to hold it there while the task loss improves it.
"""

from __future__ import annotations

import torch

from trainer.artifact import LoadedModel
from trainer.errors import IncompatibleModelsError
from trainer.model import EmbeddingModel
from trainer.preprocess import Preprocess


@torch.no_grad()
def warm_start(
    model: EmbeddingModel, prep: Preprocess, old: LoadedModel, new_rows: torch.Tensor | None = None
) -> None:
    """Copy the old model's backbone into ``model`` and its head rows for the classes both know.

    ``new_rows`` (K, D), rows in ``model.classes`` order (the BCT target head's, ``OldHead.weight()``), start
    the rows of classes the old head never had; without it they keep their random start. Raises
    ``IncompatibleModelsError`` unless the old model is a graceful torch model of the same architecture and
    input contract.
    """
    src = old.model
    if not isinstance(src, EmbeddingModel):
        raise IncompatibleModelsError(
            f"--init-from-old needs a graceful torch model as --old; {old.version} is {old.card.format}"
        )
    if src.cfg.to_dict() | {"num_classes": 0} != model.cfg.to_dict() | {"num_classes": 0}:
        raise IncompatibleModelsError(
            f"--init-from-old needs the old model's architecture: {old.version} is {src.cfg.to_dict()}, "
            f"the new model {model.cfg.to_dict()} (classes aside)"
        )
    if old.preprocess.to_dict() != prep.to_dict():
        raise IncompatibleModelsError(
            f"--init-from-old needs the old model's input contract: {old.version} takes "
            f"{old.preprocess.to_dict()}, the new model {prep.to_dict()}"
        )
    model.backbone.load_state_dict(src.backbone.state_dict())
    old_row = {c: i for i, c in enumerate(src.classes)}
    for i, c in enumerate(model.classes):
        if c in old_row:
            model.head.weight[i] = src.head.weight[old_row[c]]
        elif new_rows is not None:
            # The old head's rows are unnormalised parameters: give a new row the old rows' typical norm.
            norm = src.head.weight.norm(dim=1).mean()
            model.head.weight[i] = torch.nn.functional.normalize(new_rows[i], dim=0) * norm
