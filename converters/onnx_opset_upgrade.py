"""ONNX models at opsets 7-10 -> opset 11, before import (`upgrade_to_opset_11`).

The converters (onnx_ops*.py) are written for opsets 11-21. An older model is first checked
(every op must have a converter, or be one this module rewrites), then upgraded by ONNX's own
`onnx.version_converter.convert_version`, then corrected where that converter changes what the
model computes. What each old op needs, checked against onnxruntime running the original model
(tests/test_onnx_opsets.py):

- Upsample (opsets 7-9; scales an attribute at 7, an input from 9) and Resize-10: the version
  converter makes a Resize-11 with the default coordinate_transformation_mode half_pixel and
  nearest_mode round_prefer_floor, which picks other pixels than the old ops do for scales such
  as 3 or 1.7. The old ops map output index i to i / scale (asymmetric) and, in onnxruntime,
  take floor of it on an axis that is upsampled (scale >= 1) and ceil on one that is
  downsampled; the Resize gets those attributes back. A node that upsamples one axis and
  downsamples another has no single nearest_mode and is refused.
- BatchNormalization-7/8 `spatial`: 1 (the default; statistics per channel) is dropped by the
  version converter, as BatchNormalization-9 means the same; 0 (statistics per activation) is
  refused with the node's name.
- Pad-2 (pads, value attributes), Slice-1 (starts, ends, axes attributes), Clip-6 (min, max
  attributes), Dropout-7/10 (ratio attribute; no is_test from opset 7): the version converter
  moves the attributes into constant inputs or keeps them as opset 11 reads them.
- Unchanged in meaning from 7-10 to 11 and left as they are: Conv, Gemm (the `broadcast`
  attribute went away at opset 7, before this range), MaxPool and AveragePool (ceil_mode from
  10, count_include_pad), Concat, Flatten, Reshape (shape an input since opset 5), Sum,
  LRN, Softmax/LogSoftmax (flatten to 2-D at `axis` until opset 13; the Softmax converters
  implement that).

Opsets below 7 are refused: their BatchNormalization/Dropout `is_test` and `consumed_inputs`
attributes change the graph's meaning in ways a model zoo export at 7+ never needs.
"""
import numpy as np
import onnx
from onnx import version_converter

from pabnn.engine.errors import ConversionError

from .onnx_registry import tensor_to_array

FIRST_UPGRADED_OPSET = 7
TARGET_OPSET = 11
# Ops with no converter of their own that the upgrade turns into ones that have one.
REWRITTEN_OPS = {"Upsample": "Resize"}
_LEGACY_RESIZE_OPS = ("Upsample", "Resize")  # Resize only before opset 11


def upgrade_to_opset_11(model, opset, supported_ops):
    """`model` (an onnx.ModelProto at default-domain `opset` 7..10, nodes named) at opset 11.

    supported_ops: the op types of the default domain that have a converter at opset 11; any
    other op is refused here, naming the op, the node and what is supported."""
    if not FIRST_UPGRADED_OPSET <= opset < TARGET_OPSET:
        raise ValueError(f"upgrade_to_opset_11 takes opsets {FIRST_UPGRADED_OPSET}..{TARGET_OPSET - 1}, not {opset}")
    resize_modes = {}  # output name of an old Upsample/Resize -> nearest_mode it means
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type not in supported_ops and node.op_type not in REWRITTEN_OPS:
            raise ConversionError(f"ONNX node {node.name!r}: op {node.op_type} (opset {opset}) is not supported; "
                                  f"supported ops: {', '.join(sorted(set(supported_ops) | set(REWRITTEN_OPS)))}")
        if node.op_type == "BatchNormalization" and _attribute(node, "spatial", 1) != 1:
            raise ConversionError(f"ONNX node {node.name!r} (BatchNormalization): spatial=0 (statistics per "
                                  "activation, not per channel) is not supported")
        if node.op_type in _LEGACY_RESIZE_OPS:
            resize_modes[node.output[0]] = _legacy_nearest_mode(node, opset, model.graph)
    try:
        upgraded = version_converter.convert_version(model, TARGET_OPSET)
    except Exception as error:  # the C++ converter raises RuntimeError/ValueError with its own text
        raise ConversionError(f"ONNX opset {opset}: upgrading the model to opset {TARGET_OPSET} with "
                              f"onnx.version_converter failed: {error}") from None
    for node in upgraded.graph.node:
        if node.op_type == "Resize" and node.output[0] in resize_modes:
            _set_attribute(node, "coordinate_transformation_mode", "asymmetric")
            _set_attribute(node, "nearest_mode", resize_modes[node.output[0]])
    return upgraded


def _legacy_nearest_mode(node, opset, graph):
    """nearest_mode of an Upsample-7/9 or Resize-10 node: floor when no axis is downsampled, ceil
    when no axis is upsampled (onnxruntime's rule for these ops, per axis)."""
    if opset < 9 and node.op_type == "Upsample":
        scales = _attribute(node, "scales")
    else:
        scales = _constant(graph, node.input[1]) if len(node.input) > 1 else None
    if scales is None:
        raise ConversionError(f"ONNX node {node.name!r} ({node.op_type}): scales must be a constant "
                              "(initializer or Constant node)")
    scales = np.asarray(scales)
    if scales.dtype.kind not in "fiu" or not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise ConversionError(f"ONNX node {node.name!r} ({node.op_type}): scales must be positive numbers, found "
                              f"{scales.tolist()}")
    scales = scales.astype(np.float64).reshape(-1)
    if np.any(scales > 1) and np.any(scales < 1):
        raise ConversionError(f"ONNX node {node.name!r} ({node.op_type}): scales {scales.tolist()} upsample one "
                              "axis and downsample another; opset-10 nearest resizing rounds those differently "
                              "and is only supported when all scales are >= 1 or all are <= 1")
    return "ceil" if np.any(scales < 1) else "floor"


def _constant(graph, name):
    """The array of initializer `name` or of the Constant node (`value` tensor) that makes it, or None."""
    for tensor in graph.initializer:
        if tensor.name == name:
            return tensor_to_array(tensor, f"ONNX initializer {name!r}")
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output and _attribute(node, "value") is not None:
            return tensor_to_array(_attribute(node, "value"), f"ONNX node {node.name!r} (Constant)")
    return None


def _attribute(node, name, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _set_attribute(node, name, value):
    for index, attribute in enumerate(node.attribute):
        if attribute.name == name:
            del node.attribute[index]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))
