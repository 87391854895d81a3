"""The ONNX converter registry, the context converters write to, and the helpers several converter
modules share. The importer (onnx_import.py) and every converter module (onnx_ops*.py,
onnx_shape_folding.py, dynamic_weights.py) import this module; it imports nothing from
pabnn.converters, so that the converter modules need not import the importer or each other.

Besides the default ONNX domain, converters may be registered for the custom-op domains listed in
CUSTOM_DOMAINS (QONNX/FINN export formats, `onnx_converter(..., domain=...)`); their opset range
is the version of that domain the model imports (1 when the model does not import it). Nodes of
any other domain are refused.
"""
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from pabnn.engine.errors import ConversionError, GraphError
from pabnn.engine.graph import Node
from pabnn.engine.ops import get_op

_CONVERTERS = {}  # op key (op type, or "domain::op type") -> [(first opset, last opset, function)]
# Converters of ops that read the integer output of a QuantizeLinear (onnx_ops_quantize.py): op type -> function.
_INTEGER_CONVERTERS = {}
SUPPORTED_OPSETS = (11, 21)
CUSTOM_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general")
# The opset torch modules are exported at (torch_export.py, dynamic_weights.py).
EXPORT_OPSET = 17


def onnx_converter(op_type, first_opset=SUPPORTED_OPSETS[0], last_opset=SUPPORTED_OPSETS[1], domain=""):
    """Register `function(node, context)` as the converter of `op_type` for the opset range.

    domain: "" for the default ONNX domain, or one of CUSTOM_DOMAINS (then the range is of that
    domain's version, and the converter checks the node's inputs and attributes itself: ONNX has
    no schema for it)."""
    if domain and domain not in CUSTOM_DOMAINS:
        raise ValueError(f"ONNX converters may be registered for the default domain or {CUSTOM_DOMAINS}, "
                         f"not {domain!r}")
    key = _op_key(domain, op_type)

    def decorate(function):
        ranges = _CONVERTERS.setdefault(key, [])
        for first, last, _ in ranges:
            if first <= last_opset and first_opset <= last:
                raise ValueError(f"ONNX converter for {key} registered twice for overlapping opsets")
        ranges.append((first_opset, last_opset, function))
        return function
    return decorate


def integer_input_converter(op_type):
    """Register `function(node, context)` as the converter of `op_type` when its first input is the
    integer output of a QuantizeLinear (pending in `context.quantized`); other readers of it fail."""
    def decorate(function):
        if op_type in _INTEGER_CONVERTERS:
            raise ValueError(f"integer-input converter for {op_type} registered twice")
        _INTEGER_CONVERTERS[op_type] = function
        return function
    return decorate


def supported_onnx_ops():
    """{op key: [(first opset, last opset)]} of every registered converter; the key is the op type,
    or "domain::op type" for a custom domain (whose range is of that domain's version)."""
    return {op: [(first, last) for first, last, _ in ranges] for op, ranges in sorted(_CONVERTERS.items())}


def converter_for(node, opset):
    """The converter of `node` at `opset` (of the default domain, or of the node's custom domain)."""
    key = _op_key(node.domain, node.op_type)
    for first, last, function in _CONVERTERS.get(key, []):
        if first <= opset <= last:
            return function
    supported = ", ".join(sorted(_CONVERTERS))
    raise ConversionError(f"ONNX node {node.name!r}: op {key} (opset {opset}) is not supported; "
                          f"supported ops: {supported}")


def integer_input_converter_for(op_type):
    """The converter registered by `integer_input_converter` for `op_type`, or None."""
    return _INTEGER_CONVERTERS.get(op_type)


def _op_key(domain, op_type):
    return f"{domain}::{op_type}" if domain not in ("", "ai.onnx") else op_type


@dataclass
class ImportContext:
    """What a converter sees: constants, the opset, name aliases, and where to put IR nodes."""

    opset: int
    constants: dict = field(default_factory=dict)
    aliases: dict = field(default_factory=dict)
    nodes: list = field(default_factory=list)
    shapes: dict = field(default_factory=dict)
    graph_outputs: tuple = ()
    # Boolean outputs of comparisons with a constant (onnx_ops_binary.py), read only by Where.
    comparisons: dict = field(default_factory=dict)
    # Integer outputs of QuantizeLinear on run-time tensors (onnx_ops_quantize.py), read only by Clip
    # and DequantizeLinear: tensor name -> onnx_ops_quantize.PendingQuantization.
    quantized: dict = field(default_factory=dict)

    def fail(self, node, message):
        raise ConversionError(f"ONNX node {node.name!r} ({node.op_type}): {message}")

    def constant(self, name):
        """The constant array behind `name`, or None if it is computed at run time."""
        return self.constants.get(name)

    def tensor(self, node, name):
        """The IR tensor name behind a run-time input `name` (Identity chains resolved)."""
        if name in self.constants:
            self.fail(node, f"input {name!r} is a constant where a run-time tensor is expected")
        resolved = self.aliases.get(name, name)
        if resolved in self.comparisons:
            self.fail(node, f"input {name!r} is a boolean comparison; it is only supported as the condition of Where")
        if resolved in self.quantized:
            self.fail(node, f"input {name!r} is the integer output of QuantizeLinear "
                            f"{self.quantized[resolved].quantize_node!r}; it is only supported as the input of "
                            f"Clip or DequantizeLinear")
        if resolved not in self.shapes:
            self.fail(node, f"input {name!r} is not a graph input, an initializer or an earlier node's output")
        return resolved

    def attr(self, node, key, default=None):
        for attribute in node.attribute:
            if attribute.name == key:
                return onnx.helper.get_attribute_value(attribute)
        return default

    def emit(self, op, node, inputs, attrs=None, params=None, outputs=None, name=None):
        """Append an IR node named after the ONNX node (or `name`, for the further IR nodes of an ONNX
        node that becomes several), and record its output shapes."""
        ir_node = Node(op, name or node.name, list(inputs), list(outputs or node.output), attrs or {}, params or {})
        try:
            shapes = get_op(op, node.name).infer_shapes(ir_node, [self.shapes[name] for name in ir_node.inputs])
        except KeyError as error:
            self.fail(node, f"input {error.args[0]!r} is produced by no earlier node")
        except GraphError as error:
            raise ConversionError(f"ONNX {error}") from None
        self.shapes.update(zip(ir_node.outputs, shapes))
        self.nodes.append(ir_node)


# ---- helpers shared by the converter modules ------------------------------------------------

def tensor_to_array(tensor, where):
    """numpy array of a TensorProto (initializer or Constant value) whose data must be in the model."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise ConversionError(f"{where}: external data is not supported (save the model with its weights inside)")
    if any(d < 0 for d in tensor.dims):
        raise ConversionError(f"{where}: negative dimension in {list(tensor.dims)}")
    try:
        return numpy_helper.to_array(tensor)
    except Exception as error:  # a damaged TensorProto fails in many ways inside onnx and numpy
        raise ConversionError(f"{where}: unreadable tensor data (dims {list(tensor.dims)}, data type "
                              f"{tensor.data_type}): {type(error).__name__}: {error}") from None


def as_float32(node, context, array, what):
    """A constant as float32, rejecting NaN/Inf with a message naming the node."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        context.fail(node, f"{what} has dtype {array.dtype}; expected a float tensor")
    with np.errstate(over="ignore"):
        array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        context.fail(node, f"{what} holds NaN or Inf, or values beyond float32's range")
    return array


class _BatchSize:
    """The batch size, unknown until run time, inside a folded shape constant."""

    def __repr__(self):
        return "BATCH"


BATCH = _BatchSize()


def is_symbolic(value):
    return isinstance(value, np.ndarray) and value.dtype == object


def numeric_constant(node, context, name, what):
    """The constant behind input `name` as a numeric array; fails if it is missing or holds BATCH."""
    value = context.constant(name)
    if value is None:
        context.fail(node, f"{what} must be a constant (or computed from shapes at conversion)")
    if is_symbolic(value):
        context.fail(node, f"{what} {list(value)} depends on the batch size")
    return value


def per_channel_vector(constant, shape):
    """The [C] vector equal to `constant` broadcast over a tensor of `shape` (batch, C, ...), or
    None when the constant varies along another axis or is not per channel."""
    channels = shape[1] if len(shape) > 1 else None
    if channels is None:
        return None
    if constant.size == 1 and constant.ndim <= len(shape):
        return np.full(channels, constant.reshape(-1)[0], np.float32)
    squeezed = constant.reshape(constant.shape[1:]) if constant.ndim == len(shape) and constant.shape[0] == 1 \
        else constant
    if squeezed.shape == (channels,) + (1,) * (len(shape) - 2):
        return np.ascontiguousarray(squeezed.reshape(-1), np.float32)
    return None


def emit_softmax(node, context, op):
    """Softmax or LogSoftmax. From opset 13 over the one axis `axis` (default -1). Before opset 13
    (default axis 1) ONNX flattens the input to 2-D [d0*...*d(axis-1), d(axis)*...*d(n-1)] and
    normalizes each row: over `axis` and every axis after it together. When the axes after `axis`
    all have size 1 that is the plain op over `axis`; otherwise each sample is reshaped so that
    those axes become one, normalized, and reshaped back."""
    source = context.tensor(node, node.input[0])
    shape = context.shapes[source]
    rank = len(shape)
    axis = int(context.attr(node, "axis", 1 if context.opset < 13 else -1))
    if not -rank <= axis < rank:
        context.fail(node, f"axis {axis} is out of range for rank {rank}")
    axis %= rank
    if axis == 0:
        context.fail(node, "axis 0 normalizes over the batch; only non-batch axes are supported")
    trailing = shape[axis + 1:]
    if context.opset >= 13 or all(d == 1 for d in trailing):
        context.emit(op, node, [source], {"axis": axis})
        return
    flattened, normalized = f"{node.name}/flattened", f"{node.name}/normalized"
    context.emit("Reshape", node, [source], {"shape": list(shape[1:axis]) + [-1]}, outputs=[flattened],
                 name=flattened)
    context.emit(op, node, [flattened], {"axis": axis}, outputs=[normalized], name=normalized)
    context.emit("Reshape", node, [normalized], {"shape": list(shape[1:])})


def spatial_attrs(node, context, kernel_hw, input_shape):
    """strides, pads [top, left, bottom, right], dilations of a 2-D conv or pool node.

    auto_pad SAME_UPPER/SAME_LOWER pads so that out = ceil(in / stride); the odd unit of padding
    goes to the end (SAME_UPPER) or the beginning (SAME_LOWER).
    """
    if len(kernel_hw) != 2:
        context.fail(node, f"only 2-D kernels are supported, found kernel shape {list(kernel_hw)}")
    auto_pad = context.attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        context.fail(node, f"auto_pad={auto_pad} is not supported")
    strides = list(context.attr(node, "strides", [1, 1]))
    dilations = list(context.attr(node, "dilations", [1, 1]))
    pads = list(context.attr(node, "pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else [0, 0, 0, 0]
    if len(strides) != 2 or len(dilations) != 2 or len(pads) != 4 or len(input_shape) != 4:
        context.fail(node, f"expected 2 strides, 2 dilations, 4 pads and a 4-d input, found {strides}, {dilations}, "
                           f"{pads}, {list(input_shape)}")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for axis in range(2):
            size, stride = input_shape[2 + axis], int(strides[axis])
            span = int(dilations[axis]) * (int(kernel_hw[axis]) - 1) + 1
            total = max(0, (math.ceil(size / stride) - 1) * stride + span - size)
            small, large = total // 2, total - total // 2
            pads[axis], pads[axis + 2] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    return [int(s) for s in strides], [int(p) for p in pads], [int(d) for d in dilations]
