"""The fused epilogue of Conv and PAConv: y = activation(conv(x) + b + residual).

attrs: activation, None or "relu". A second input, when present, is the residual: a tensor of
the output's shape added before the activation (the ResNet shortcut). `engine/fusion.py` (a Session's lowering) makes
these from Conv -> Add -> Relu chains; converters write plain nodes.
"""
import numpy as np

from ..errors import GraphError
from . import _attrs

ACTIVATIONS = (None, "relu")


def check_arity(node, outputs=1):
    """1 input (+ 1 residual) and `outputs` outputs; call before reading input shapes."""
    if len(node.inputs) not in (1, 2) or len(node.outputs) != outputs:
        raise GraphError(f"node {node.name!r} ({node.op}): expects 1 input (+ 1 residual) and {outputs} output(s), "
                         f"found {len(node.inputs)} and {len(node.outputs)}")


def check(node, input_shapes, output_shape, outputs=1):
    """Validate the epilogue attributes and the residual's shape."""
    check_arity(node, outputs)
    if node.attrs.get("activation") not in ACTIVATIONS:
        raise GraphError(f"node {node.name!r} ({node.op}): activation must be one of {ACTIVATIONS}, "
                         f"found {node.attrs.get('activation')!r}")
    if len(input_shapes) == 2:
        _attrs.expect_shape(node, "residual input", input_shapes[1], output_shape)


def apply(node, y, inputs):
    """The epilogue on a computed conv output `y` (in place when y is writable); `inputs` are
    the node's inputs (the residual is the second)."""
    return apply_residual(node, y, inputs[1] if len(inputs) == 2 else None)


def apply_residual(node, y, residual):
    """The epilogue on `y` (in place when y is writable) with this `residual` (None: no residual),
    for a part of the output and the same part of the residual."""
    if residual is not None:
        y += residual
    if node.attrs.get("activation") == "relu":
        np.maximum(y, 0, out=y)
    return y
