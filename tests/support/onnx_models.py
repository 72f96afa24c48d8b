"""ONNX files for the tests: a graceful model exported by torch, and small hand-built graphs (valid or
hostile) made with onnx.helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.artifact import load_model
from trainer.onnx_model import export_onnx

REGISTER_ARGS = ["--size", "28", "--channels", "1", "--mean", "0.286", "--std", "0.353"]


def export_model(folder: Path, path: Path, logits: bool = True) -> Path:
    """Export the model version at ``folder`` to ``path`` (trainer.onnx_model.export_onnx: dynamic batch)."""
    loaded = load_model(folder)
    return export_onnx(loaded.model, loaded.preprocess.shape, path, logits=logits)


def linear_graph(
    path: Path,
    *,
    dim: int = 8,
    input_shape: tuple = ("n", 1, 28, 28),
    op_domain: str = "",
    extra_input: bool = False,
    external_location: str | None = None,
) -> Path:
    """A tiny valid graph (Flatten -> MatMul: (N, 1, 28, 28) -> (N, dim)) or a hostile variant: a node of a
    custom domain, a second input, or its weights in an external file at ``external_location``."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(784, dim)).astype(np.float32), name="w")
    if external_location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for k, v in (("location", external_location), ("offset", "0"), ("length", str(784 * dim * 4))):
            entry = w.external_data.add()
            entry.key, entry.value = k, v
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["raw"]),
        helper.make_node("Relu" if not op_domain else "Evil", ["raw"], ["embedding"], domain=op_domain),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(input_shape))]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["n", 1]))
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", dim])],
        initializer=[w],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(op_domain, 1)] if op_domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path
