"""`graceful register-onnx`: wrap an ONNX export in a model version folder.

The graph is checked (trainer/onnx_model.py) and test-run; then the training images of the card's classes
are embedded once to give the version a classifier head, which BCT needs as the old model's head:

- an export with a second (N, K) output (logits): the rows are fitted to those logits by least squares
  (along the embeddings' own directions) on the embeddings (rows ``W`` minimising ||E W^T - L||); a cosine head is
  linear in unit embeddings, so this reproduces the export's own classifier (exactly for a cosine head like
  graceful's), where class means would only approximate it. Both are measured and stored in the card
  (``metrics.head``), and the one whose argmax agrees better with the export's is kept;
- an export without logits: the rows are the class-mean embeddings (the BCT paper's synthesised classifier).

The folder is written under a temporary name and renamed into place at the end: a refused file leaves
nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.artifact import CARD_FILE, ModelCard, check_version_name, file_sha256
from trainer.errors import ConfigError, OnnxModelError
from trainer.model import CosineHead
from trainer.onnx_model import (
    DEFAULT_MAX_BYTES,
    HEAD_FILE,
    HEAD_TENSOR,
    ONNX_FILE,
    ONNX_FORMAT,
    OnnxModel,
    check_onnx_bytes,
    read_onnx_bytes,
    sha256_bytes,
)
from trainer.preprocess import Preprocess

log = logging.getLogger(__name__)
LSTSQ_RCOND = 1e-4  # directions of the embeddings under this share of the largest singular value: left out


@dataclass
class RegisterConfig:
    """Everything a registration depends on; stored in the card as ``train_config``."""

    model: str  # the .onnx file
    out: str  # the version folder to write (its name is the version)
    size: list[int]  # [H] or [H, W]
    channels: int = 1
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    classes: str | None = None  # e.g. "0-4"; None = every class of the dataset (or range(K) of the logits)
    data: str | None = None
    resize: str = "fit"
    interpolation: str = "bilinear"
    scale: float = 4.0  # the head's cosine scale when the rows are class means (logits: fitted)
    sample: int | None = None  # embed a seeded slice of this many training images (None: all of them)
    max_bytes: int = DEFAULT_MAX_BYTES
    seed: int = 0
    batch_size: int = 512
    threads: int | None = None


@dataclass
class RegisterResult:
    card: ModelCard
    path: Path
    seconds: float


def _contract(cfg: RegisterConfig) -> Preprocess:
    if len(cfg.size) not in (1, 2):
        raise ConfigError(f"--size takes H or H W, got {len(cfg.size)} values")
    h, w = cfg.size[0], cfg.size[-1]
    return Preprocess(
        channels=cfg.channels,
        height=h,
        width=w,
        resize=cfg.resize,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation=cfg.interpolation,
    )


def _contract_batches(ds: Any, prep: Preprocess, bs: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """((B, C, H, W) uint8 under ``prep``, (B,) labels) over a split, each image from its source."""
    try:
        from trainer.data import iter_views
    except ImportError:  # a data module that holds every split in memory
        for i in range(0, len(ds), bs):
            yield prep.from_array(ds.images[i : i + bs]), ds.labels[i : i + bs]
        return
    for (x,), y in iter_views(ds, [prep], bs):
        yield x.numpy(), y.numpy()


def _embed_sample(
    model: OnnxModel, prep: Preprocess, ds: Any, classes: list[int], bs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(N, D) unit embeddings, (N,) rows in ``classes`` and (N, K) logits (None without a logits output)."""
    pos = {c: i for i, c in enumerate(classes)}
    embs, logits, rows = [], [], []
    for x8, y in _contract_batches(ds, prep, bs):
        outs = model.run(prep(x8), logits=True)
        embs.append(torch.nn.functional.normalize(torch.from_numpy(outs[0]).float(), dim=1))
        if len(outs) == 2:
            logits.append(torch.from_numpy(outs[1]).float())
        rows.append(torch.tensor([pos[int(v)] for v in y], dtype=torch.long))
    return torch.cat(embs), torch.cat(rows), (torch.cat(logits) if logits else None)


def fit_head(
    emb: torch.Tensor, rows: torch.Tensor, logits: torch.Tensor | None, classes: list[int], scale: float
) -> tuple[torch.Tensor, float, dict[str, Any]]:
    """The head's (K, D) rows and scale, and what was measured choosing them.

    With logits: least squares ``rows = argmin ||emb @ rows.T - logits||`` (``lstsq_rows``; the scale is
    the rows' mean norm, as a cosine head of scale s on unit embeddings has rows of norm s); the class-mean
    head is measured beside it (agreement of its argmax with the export's) and kept instead if it agrees
    better. Without: class means at ``scale``."""
    from trainer.losses import class_means

    means = class_means(emb, rows, classes)  # (K, D)
    acc = lambda w: round(float((cosine_logits(emb, w).argmax(1) == rows).float().mean()), 4)  # noqa: E731
    info: dict[str, Any] = {"sample": len(emb)}
    if logits is None:
        info.update(method="class-mean", train_top1=acc(means))
        return means, scale, info
    target = logits.argmax(1)
    fitted = lstsq_rows(emb, logits)  # (K, D)
    fit_scale = float(fitted.norm(dim=1).mean())
    resid = float((emb @ fitted.T - logits).norm() / logits.norm().clamp_min(1e-12))
    agree = lambda w: round(float((cosine_logits(emb, w).argmax(1) == target).float().mean()), 4)  # noqa: E731
    fit_agree, mean_agree = agree(fitted), agree(means)
    # Embeddings spanning fewer than D dims leave the rows' norms (which a cosine head divides by)
    # undetermined: the class means are kept then if they reproduce the export's decisions better.
    use_fit = fit_agree >= mean_agree
    info.update(
        method="logits-lstsq" if use_fit else "class-mean",
        effective_rank=int(torch.linalg.matrix_rank(emb.double(), rtol=LSTSQ_RCOND)),  # what the fit uses
        relative_residual=round(resid, 6),
        agreement_with_logits=fit_agree if use_fit else mean_agree,
        lstsq_agreement_with_logits=fit_agree,
        class_mean_agreement_with_logits=mean_agree,
        export_train_top1=round(float((target == rows).float().mean()), 4),
        train_top1=acc(fitted if use_fit else means),
        class_mean_train_top1=acc(means),
    )
    return (fitted, fit_scale, info) if use_fit else (means, scale, info)


def lstsq_rows(emb: torch.Tensor, logits: torch.Tensor, rcond: float | None = None) -> torch.Tensor:
    """(K, D) rows ``W`` minimising ||emb W^T - logits||, in float64, along the embeddings' own directions.

    A trained model's embeddings fill a subspace of R^D (on Fashion-MNIST the real v1's singular values fall
    from ~40 to ~1e-7): plain least squares puts arbitrary, large components along the unused directions,
    and a cosine head, which divides by the rows' norms, is thrown off (agreement 0.99 on the real v1).
    Directions with a singular value under ``rcond`` times the largest are left out (SVD least squares,
    gelsd), so the rows stay in the embeddings' subspace, where a trained head's rows lie: the real v1's are
    recovered exactly (cosine 1.0, norm = its scale 4)."""
    rcond = LSTSQ_RCOND if rcond is None else rcond
    sol = torch.linalg.lstsq(emb.double(), logits.double(), rcond=rcond, driver="gelsd").solution
    return sol.T.float()


def cosine_logits(emb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(rows, dim=1).T


def register_onnx(cfg: RegisterConfig) -> RegisterResult:
    """Check ``cfg.model``, fit its head, and write the version folder ``cfg.out``. Raises
    ``OnnxModelError`` (a ``ModelCardError``) for a refused file, ``ConfigError``/``DatasetError`` for bad
    arguments; writes nothing then."""
    from safetensors.torch import save_file

    from trainer.data import load_split, parse_classes

    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # before the session: onnxruntime takes torch's thread count
    out = Path(cfg.out)
    version = check_version_name(out.name)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty: choose another --out or remove it")
    if cfg.max_bytes < 1:
        raise ConfigError(f"--max-mib must be positive, got {cfg.max_bytes / 2**20:g}")
    prep = _contract(cfg)
    src = Path(cfg.model)
    data = read_onnx_bytes(src, cfg.max_bytes)
    session, sig = check_onnx_bytes(data, prep.shape, src.name)
    assert sig.embedding_dim is not None

    train = load_split(cfg.data, "train")
    if cfg.classes is None and sig.num_classes is not None:
        classes = list(range(sig.num_classes))
    else:
        classes = parse_classes(cfg.classes, train.num_classes)
    if sig.num_classes is not None and sig.num_classes != len(classes):
        raise OnnxModelError(
            f"{src.name} writes {sig.num_classes} logits, but the card has {len(classes)} classes "
            f"({cfg.classes or 'all'}): pass --classes naming the {sig.num_classes} classes, in the logits' order"
        )
    sample = train.subset(classes)
    if cfg.sample:
        sample = sample.take(cfg.sample, seed=cfg.seed)
    placeholder = CosineHead(sig.embedding_dim, len(classes), cfg.scale)
    model = OnnxModel(session, sig, placeholder, classes)
    emb, rows, logits = _embed_sample(model, prep, sample, classes, cfg.batch_size)
    weight, scale, head_info = fit_head(emb, rows, logits, classes, cfg.scale)
    log.info("head of %s: %s", version, head_info)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the version from a service running as another user
    try:
        (tmp / ONNX_FILE).write_bytes(data)  # the bytes that were checked, not a second read of the source
        save_file({HEAD_TENSOR: weight.contiguous()}, str(tmp / HEAD_FILE), metadata={"format": ONNX_FORMAT})
        card = ModelCard(
            format=ONNX_FORMAT,
            version=version,
            arch={
                "name": "onnx",
                "embedding_dim": sig.embedding_dim,
                "num_classes": len(classes),
                "in_channels": prep.channels,
                "scale": scale,
                "input": sig.input,
                "embedding_output": sig.embedding_output,
                "logits_output": sig.logits_output,
                "batch": sig.batch,
                "opsets": sig.opsets,
                "onnx_bytes": len(data),
            },
            embedding_dim=sig.embedding_dim,
            classes=classes,
            class_names=[train.class_names[c] for c in classes] if train.class_names else [],
            space=version,
            compatible_with=None,
            preprocess=prep.to_dict(),
            train_config={
                **{k: v for k, v in vars(cfg).items() if k not in ("out", "threads")},
                "model": src.name,
                "seconds": round(time.perf_counter() - t0, 1),
            },
            metrics={"head": head_info},
            weights=HEAD_FILE,
            weights_sha256=file_sha256(tmp / HEAD_FILE),
            onnx_file=ONNX_FILE,
            onnx_sha256=sha256_bytes(data),
        )
        (tmp / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RegisterResult(card=card, path=out, seconds=time.perf_counter() - t0)
