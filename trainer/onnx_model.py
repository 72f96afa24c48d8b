"""A model version held as an ONNX export, embedded through onnxruntime.

A team's production model usually exists as an ONNX file. Such a folder holds ``model.onnx`` (copied in at
registration, its sha256 in the card), ``head.safetensors`` (the rows of a frozen cosine head: fitted to the
export's logits, or synthesised from class-mean embeddings) and ``card.json`` with ``format: "onnx"``.

The graph is checked before anything runs it, at registration, when a models dir is read and when it is
loaded: ONNX that parses and passes ``onnx.checker``; exactly one float image input of the card's (N, C, H,
W); one (N, D) float output, and optionally a second (N, K) taken as logits; operators of the standard
domains only (a custom domain would need code from elsewhere); no external data (one file, checksummed);
a bounded file size. onnxruntime is then given the very bytes that were hashed, never a path, so nothing
beside the file is read. ``OnnxModel`` offers the face of ``EmbeddingModel`` the rest of graceful uses:
``embed``, ``classify``, ``head``, ``classes``, ``__call__``; no gradient flows through it (none is needed:
BCT only reads the old model).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import OnnxModelError
from trainer.model import CosineHead, EmbeddingModel

if TYPE_CHECKING:
    import onnx
    import onnxruntime

ONNX_FORMAT = "onnx"
ONNX_FILE = "model.onnx"
HEAD_FILE = "head.safetensors"
HEAD_TENSOR = "head.weight"
DEFAULT_MAX_BYTES = 512 << 20  # 512 MiB: register-onnx --max-mib
# ai.onnx is spelled "" in most files; ai.onnx.ml holds the classic-ML operators onnxruntime ships.
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
PROBE_BATCH = 2


@dataclass(frozen=True)
class OnnxSignature:
    """What graceful uses of a graph: its image input, the embedding output and optional logits output.

    ``batch`` is the input's fixed batch size (None when dynamic); ``embedding_dim`` and ``num_classes``
    are None until a test run fixes them (their dims may be symbolic in the file)."""

    input: str
    embedding_output: str
    logits_output: str | None
    batch: int | None
    embedding_dim: int | None
    num_classes: int | None
    opsets: dict[str, int]


def read_onnx_bytes(path: Path, max_bytes: int = DEFAULT_MAX_BYTES, flag: str = "--max-mib") -> bytes:
    """The bytes of an ONNX file, refused before reading when larger than ``max_bytes``."""
    if path.is_symlink() or not path.is_file():
        raise OnnxModelError(f"{path} is not a regular file (links are refused)")
    size = path.stat().st_size
    if size > max_bytes:
        raise OnnxModelError(
            f"{path.name} is {size / 2**20:.3g} MiB, over the limit of {max_bytes / 2**20:.3g} MiB "
            f"(raise it with {flag})"
        )
    data = path.read_bytes()
    if len(data) > max_bytes:  # grew while we looked
        raise OnnxModelError(f"{path.name} is over the limit of {max_bytes / 2**20:.3g} MiB ({flag})")
    return data


def parse_onnx(data: bytes, what: str) -> onnx.ModelProto:
    """Bytes -> ModelProto, or ``OnnxModelError`` when they are not an ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError, TypeError) as e:
        raise OnnxModelError(f"{what} is not an ONNX model ({type(e).__name__}: {e})") from None
    if not proto.HasField("graph") or not proto.graph.node:
        # protobuf reads many byte strings as an (almost) empty message: that is not a model either
        raise OnnxModelError(f"{what} is not an ONNX model (no graph)")
    return proto


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    import onnx

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every stored tensor: initializers (dense and sparse) and constant attributes."""
    import onnx

    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int, list[int | None]] | None:
    """(elem_type, dims with None for symbolic ones), or None when the value is not a tensor."""
    if not value_info.type.HasField("tensor_type"):
        return None
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type, []
    return tt.elem_type, [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def inspect_onnx(proto: onnx.ModelProto, shape: tuple[int, int, int], what: str) -> OnnxSignature:
    """Check a parsed graph against a card's input contract ``shape`` (C, H, W); raise ``OnnxModelError``
    saying what is wrong. Runs nothing."""
    import onnx

    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import}
    custom = sorted(
        {o.domain for o in proto.opset_import if o.domain not in STANDARD_DOMAINS}
        | {n.domain for g in _graphs(proto.graph) for n in g.node if n.domain not in STANDARD_DOMAINS}
    )
    if custom or proto.functions:
        ops = sorted(
            {
                f"{n.domain}::{n.op_type}"
                for g in _graphs(proto.graph)
                for n in g.node
                if n.domain not in STANDARD_DOMAINS
            }
        )
        raise OnnxModelError(
            f"{what} uses operators outside the standard ONNX domains (ai.onnx, ai.onnx.ml): "
            f"{', '.join(ops or custom or ['model-local functions'])}; custom operators need code graceful "
            "does not load: export with standard operators only"
        )
    for g in _graphs(proto.graph):
        for t in _tensors(g):
            if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
                where = {e.key: e.value for e in t.external_data}.get("location", "?")
                raise OnnxModelError(
                    f"{what} keeps tensor {t.name!r} in an external file ({where!r}); graceful reads and "
                    "checksums one file: save the model with its weights inside "
                    "(onnx.save_model(model, path, save_as_external_data=False))"
                )
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxModelError(f"{what} fails the ONNX checker: {first}") from None

    stored = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in stored]
    if len(inputs) != 1:
        raise OnnxModelError(
            f"{what} has {len(inputs)} inputs ({', '.join(v.name for v in inputs)}); graceful feeds exactly "
            "one: the image batch (N, C, H, W)"
        )
    inp = inputs[0]
    dims = _dims(inp)
    want = f"float (N, {shape[0]}, {shape[1]}, {shape[2]})"
    if dims is None or dims[0] != onnx.TensorProto.FLOAT or len(dims[1]) != 4:
        got = "not a tensor" if dims is None else _describe(dims)
        raise OnnxModelError(
            f"{what}: input {inp.name!r} is {got}, the card's contract is {want} (--channels, --size H [W])"
        )
    batch, *chw = dims[1]
    if any(d is not None and d != s for d, s in zip(chw, shape, strict=True)):
        raise OnnxModelError(
            f"{what}: input {inp.name!r} is {_describe(dims)}, the card's contract is {want} "
            "(--channels, --size H [W])"
        )
    outputs = list(proto.graph.output)
    if not 1 <= len(outputs) <= 2:
        raise OnnxModelError(
            f"{what} has {len(outputs)} outputs; graceful takes one (N, D) embedding output and "
            "optionally a second (N, K) logits output"
        )
    found: list[int | None] = []
    for role, out in zip(("embedding", "logits"), outputs, strict=False):
        od = _dims(out)
        if od is None or od[0] != onnx.TensorProto.FLOAT or (od[1] and len(od[1]) != 2):
            got = "not a tensor" if od is None else _describe(od)
            raise OnnxModelError(f"{what}: output {out.name!r} ({role}) is {got}; expected float (N, D)")
        found.append(od[1][1] if od[1] else None)
    return OnnxSignature(
        input=inp.name,
        embedding_output=outputs[0].name,
        logits_output=outputs[1].name if len(outputs) == 2 else None,
        batch=batch if batch else None,
        embedding_dim=found[0],
        num_classes=found[1] if len(found) == 2 else None,
        opsets=opsets,
    )


def _describe(dims: tuple[int, list[int | None]]) -> str:
    import onnx

    kind = onnx.helper.tensor_dtype_to_np_dtype(dims[0]).name if dims[0] else "untyped"
    return f"{kind} ({', '.join('?' if d is None else str(d) for d in dims[1])})"


def make_session(data: bytes, what: str) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session over the model's bytes (never a path: nothing beside them is read), with
    as many intra-op threads as torch uses."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: a graph that fails says so through the exception
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxModelError(f"onnxruntime cannot load {what}: {first}") from None


def probe(
    session: onnxruntime.InferenceSession, sig: OnnxSignature, shape: tuple[int, int, int], what: str
) -> OnnxSignature:
    """Run a batch of zero images; check the outputs' shapes and values; return the signature with D and K."""
    n = sig.batch or PROBE_BATCH
    names = [sig.embedding_output] + ([sig.logits_output] if sig.logits_output else [])
    try:
        outs = session.run(names, {sig.input: np.zeros((n, *shape), np.float32)})
    except Exception as e:  # onnxruntime's own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxModelError(f"{what}: the test run on a zero batch {(n, *shape)} failed: {first}") from None
    dims: list[int] = []
    for name, out in zip(names, outs, strict=True):
        arr = np.asarray(out)
        if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] < 1:
            raise OnnxModelError(
                f"{what}: on a batch of {n}, output {name!r} has shape {arr.shape}, expected ({n}, D)"
            )
        if arr.dtype != np.float32 or not np.isfinite(arr).all():
            raise OnnxModelError(f"{what}: output {name!r} is not finite float32 on a zero batch")
        dims.append(int(arr.shape[1]))
    for stated, got, name in zip((sig.embedding_dim, sig.num_classes), dims, names, strict=False):
        if stated is not None and stated != got:
            raise OnnxModelError(f"{what}: output {name!r} states width {stated} but writes {got}")
    return OnnxSignature(
        input=sig.input,
        embedding_output=sig.embedding_output,
        logits_output=sig.logits_output,
        batch=sig.batch,
        embedding_dim=dims[0],
        num_classes=dims[1] if len(dims) == 2 else None,
        opsets=sig.opsets,
    )


def check_onnx_bytes(
    data: bytes, shape: tuple[int, int, int], what: str
) -> tuple[onnxruntime.InferenceSession, OnnxSignature]:
    """Every check of a graph, the test run included: (session, signature with D and K)."""
    sig = inspect_onnx(parse_onnx(data, what), shape, what)
    session = make_session(data, what)
    return session, probe(session, sig, shape, what)


class OnnxModel(nn.Module):
    """An ONNX export behind ``EmbeddingModel``'s face: ``embed`` runs onnxruntime, ``classify`` a frozen
    cosine head whose rows came from the registration. Nothing here is trainable."""

    def __init__(
        self,
        session: onnxruntime.InferenceSession,
        signature: OnnxSignature,
        head: CosineHead,
        classes: list[int],
    ) -> None:
        super().__init__()
        if head.weight.shape[0] != len(classes):
            raise OnnxModelError(f"{head.weight.shape[0]} head rows for {len(classes)} classes")
        self.session = session
        self.signature = signature
        self.classes = list(classes)
        self.head = head.requires_grad_(False)

    @property
    def embedding_dim(self) -> int:
        return int(self.head.weight.shape[1])

    def run(self, x: torch.Tensor, logits: bool = False) -> list[np.ndarray]:
        """(B, C, H, W) normalised floats -> the graph's raw outputs (embedding[, logits]) as numpy."""
        sig = self.signature
        names = [sig.embedding_output] + ([sig.logits_output] if logits and sig.logits_output else [])
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if not sig.batch:
            return [np.asarray(o) for o in self.session.run(names, {sig.input: arr})]
        parts: list[list[np.ndarray]] = []
        for i in range(0, len(arr), sig.batch):  # a fixed batch size: full chunks, the last one padded
            chunk = arr[i : i + sig.batch]
            pad = np.zeros((sig.batch - len(chunk), *arr.shape[1:]), np.float32)
            outs = self.session.run(names, {sig.input: np.concatenate([chunk, pad])})
            parts.append([np.asarray(o)[: len(chunk)] for o in outs])
        return [np.concatenate(cols) for cols in zip(*parts, strict=True)]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised floats -> (B, D) unit-norm embeddings (re-normalised: an export need not)."""
        if len(x) == 0:
            return torch.zeros(0, self.embedding_dim, device=x.device)
        # onnxruntime runs on the CPU; the result goes back to the caller's device (training on cuda)
        return F.normalize(torch.from_numpy(self.run(x)[0]).float(), dim=1).to(x.device)

    def classify(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings -> (B, K) logits over ``self.classes`` through the frozen head."""
        return self.head(emb)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(x)
        return emb, self.classify(emb)

    label_to_row = EmbeddingModel.label_to_row


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_onnx_model(folder: Path, card: Any, state: dict[str, torch.Tensor]) -> OnnxModel:
    """Load an ONNX version from ``folder``: its ``card`` (a ``ModelCard`` of format onnx) and the head
    tensors already read and checksummed (``state``). Raises ``OnnxModelError`` saying what is wrong."""
    from trainer.preprocess import Preprocess

    path = onnx_path(folder, card)
    _check_size(path, folder, card)
    data = path.read_bytes()
    if sha256_bytes(data) != card.onnx_sha256:
        raise OnnxModelError(f"{path} does not match the checksum in its card (corrupt or replaced): refused")
    shape = Preprocess.from_dict(card.preprocess).shape
    session, sig = check_onnx_bytes(data, shape, f"{card.version}/{path.name}")
    if sig.embedding_dim != card.embedding_dim:
        raise OnnxModelError(
            f"{path} writes {sig.embedding_dim}-d embeddings, its card says {card.embedding_dim}"
        )
    if sig.num_classes is not None and sig.num_classes != len(card.classes):
        raise OnnxModelError(f"{path} writes {sig.num_classes} logits for {len(card.classes)} card classes")
    weight = state.get(HEAD_TENSOR)
    if set(state) != {HEAD_TENSOR} or weight is None:
        raise OnnxModelError(f"{card.weights} in {folder.name} must hold exactly {HEAD_TENSOR!r}")
    if tuple(weight.shape) != (len(card.classes), card.embedding_dim):
        raise OnnxModelError(
            f"{card.weights} in {folder.name} holds {tuple(weight.shape)} head rows, expected "
            f"({len(card.classes)}, {card.embedding_dim})"
        )
    head = CosineHead(card.embedding_dim, len(card.classes), float(card.arch.get("scale", 4.0)))
    head.weight.data.copy_(weight.float())
    return OnnxModel(session, sig, head, list(card.classes)).eval().requires_grad_(False)


def onnx_path(folder: Path, card: Any) -> Path:
    """The ONNX file of an onnx card: a regular file inside ``folder`` with a checksum in the card."""
    if not card.onnx_file or not card.onnx_sha256:
        raise OnnxModelError(f"the card of {folder.name} is format onnx but names no onnx_file/onnx_sha256")
    path = folder / card.onnx_file
    if path.is_symlink() or not path.is_file():
        raise OnnxModelError(f"{folder.name} has no regular ONNX file {card.onnx_file} (links are refused)")
    if path.resolve().parent != folder.resolve():
        raise OnnxModelError(f"{path} lies outside its model folder: refused")
    return path


def _check_size(path: Path, folder: Path, card: Any) -> None:
    """The file is the size its card states (checked before reading it: a replaced file may be huge)."""
    size = path.stat().st_size
    stated = card.arch.get("onnx_bytes")
    if stated is not None and size != int(stated):
        raise OnnxModelError(f"{path.name} in {folder.name} is {size} bytes, its card says {stated}: refused")


def verify_onnx(folder: Path, card: Any) -> None:
    """The checks of a models-dir survey for an ONNX version, without running it: the file's checksum and
    size, and the graph's structure (inputs, outputs, operator domains, no external data)."""
    from trainer.preprocess import Preprocess

    path = onnx_path(folder, card)
    _check_size(path, folder, card)
    data = path.read_bytes()
    if sha256_bytes(data) != card.onnx_sha256:
        raise OnnxModelError(
            f"{path.name} in {folder.name} does not match the checksum in its card (corrupt or replaced): refused"
        )
    sig = inspect_onnx(
        parse_onnx(data, f"{folder.name}/{path.name}"),
        Preprocess.from_dict(card.preprocess).shape,
        f"{folder.name}/{path.name}",
    )
    if sig.embedding_dim is not None and sig.embedding_dim != card.embedding_dim:
        raise OnnxModelError(
            f"{path.name} in {folder.name} writes {sig.embedding_dim}-d embeddings, card says {card.embedding_dim}"
        )


class _ExportWrapper(nn.Module):
    """``embed`` (+ ``classify``) of a graceful model as a graph's outputs."""

    def __init__(self, model: nn.Module, logits: bool) -> None:
        super().__init__()
        self.model, self.logits = model, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        emb = self.model.embed(x)
        return (emb, self.model.classify(emb)) if self.logits else emb


def export_onnx(model: nn.Module, shape: tuple[int, int, int], path: Path, logits: bool = True) -> Path:
    """Export a graceful model (``embed``/``classify``) to ``path`` as an ONNX graph: input ``image`` (N, C,
    H, W) for ``shape`` (C, H, W), outputs ``embedding`` (N, D) and, with ``logits``, ``logits`` (N, K); a
    dynamic batch. TorchScript exporter (``dynamo=False``: no onnxscript needed). The model's training mode
    is kept as it was (the exporter switches it)."""
    import warnings

    names = ["embedding", "logits"] if logits else ["embedding"]
    was_training = model.training
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notice of the TorchScript path
            torch.onnx.export(
                _ExportWrapper(model, logits).eval(),
                (torch.zeros(2, *shape),),
                str(path),
                dynamo=False,
                input_names=["image"],
                output_names=names,
                dynamic_axes={n: {0: "n"} for n in ["image", *names]},
            )
    finally:
        model.train(was_training)
    return path
