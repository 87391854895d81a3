"""Elementwise activations: Sigmoid, Tanh, HardSigmoid, HardSwish, LeakyRelu, Clip, PRelu, and
LogSoftmax.

    Sigmoid(x)     = 1 / (1 + exp(-x))
    Tanh(x)        = tanh(x)
    HardSigmoid(x) = max(0, min(1, alpha * x + beta))        attrs: alpha, beta
    HardSwish(x)   = x * max(0, min(1, x / 6 + 1 / 2))
    LeakyRelu(x)   = x if x >= 0 else alpha * x              attrs: alpha
    Clip(x)        = min(max(x, min), max)                   attrs: min, max (null: unbounded)
    PRelu(x)       = x if x >= 0 else slope * x              params: slope float32, broadcast to x
    LogSoftmax(x)  = x - max - log(sum(exp(x - max))) over one non-batch axis; attrs: axis

Every op keeps the shape of its input. The kernels compute in float32, the references in float64.
"""
import numpy as np

from ..errors import GraphError
from . import _attrs
from .elementwise import _softmax_axis, _unary_cost, _unary_infer_shapes
from .registry import Op, register


def _number(node, key, default):
    value = node.attrs.get(key, default)
    if not _attrs.is_finite_number(value):
        raise GraphError(f"node {node.name!r} ({node.op}): attribute {key!r} must be a finite number, found {value!r}")
    return float(value)


def _unary(name, summary, function, infer_shapes=_unary_infer_shapes, attributes=()):
    """Register op `name` computing function(node, x, float_type) in float64 (reference) and float32 (kernel)."""
    def reference(node, inputs):
        return [function(node, inputs[0], np.float64)]

    def make_kernel(node):
        def run(inputs):
            x = np.asarray(inputs[0], dtype=np.float32)
            return [np.asarray(function(node, x, np.float32), dtype=np.float32)]
        return run

    register(Op(name, summary, infer_shapes, reference, make_kernel, _unary_cost, attributes=attributes))


def _sigmoid(node, x, float_type):
    # tanh form: no overflow of exp(-x) for large negative x.
    half = float_type(0.5)
    return half * np.tanh(half * x) + half


def _tanh(node, x, float_type):
    return np.tanh(x)


def _hard_sigmoid(node, x, float_type):
    alpha = float_type(_number(node, "alpha", 0.2))
    beta = float_type(_number(node, "beta", 0.5))
    return np.clip(alpha * x + beta, float_type(0.0), float_type(1.0))


def _hard_swish(node, x, float_type):
    return x * np.clip(x / float_type(6.0) + float_type(0.5), float_type(0.0), float_type(1.0))


def _leaky_relu(node, x, float_type):
    alpha = float_type(_number(node, "alpha", 0.01))
    return np.where(x >= 0, x, alpha * x)


def _clip_bounds(node):
    bounds = []
    for key, unbounded in (("min", -np.inf), ("max", np.inf)):
        value = node.attrs.get(key)
        bounds.append(unbounded if value is None else _number(node, key, None))
    return bounds


def _clip_infer_shapes(node, input_shapes):
    _clip_bounds(node)
    return _unary_infer_shapes(node, input_shapes)


def _clip(node, x, float_type):
    low, high = _clip_bounds(node)
    # ONNX Clip with min > max gives max everywhere; np.minimum after np.maximum does the same.
    return np.minimum(np.maximum(x, float_type(low)), float_type(high))


def _checked_unary(checks):
    def infer_shapes(node, input_shapes):
        checks(node)
        return _unary_infer_shapes(node, input_shapes)
    return infer_shapes


_unary("Sigmoid", "1 / (1 + exp(-x))", _sigmoid)
_unary("Tanh", "tanh(x)", _tanh)
_unary("HardSigmoid", "max(0, min(1, alpha * x + beta))", _hard_sigmoid,
       _checked_unary(lambda node: (_number(node, "alpha", 0.2), _number(node, "beta", 0.5))), ("alpha", "beta"))
_unary("HardSwish", "x * max(0, min(1, x / 6 + 1/2))", _hard_swish)
_unary("LeakyRelu", "x if x >= 0 else alpha * x", _leaky_relu, _checked_unary(lambda node: _number(node, "alpha", 0.01)),
       ("alpha",))
_unary("Clip", "min(max(x, min), max)", _clip, _clip_infer_shapes, ("min", "max"))


# ---- PRelu ----------------------------------------------------------------------------------

def _slope(node, input_shape=None):
    slope = node.params.get("slope")
    if not isinstance(slope, np.ndarray) or slope.dtype != np.float32:
        raise GraphError(f"node {node.name!r} (PRelu): parameter 'slope' must be a float32 array")
    if input_shape is not None:
        rank = len(input_shape)
        try:
            shape = np.broadcast_shapes((2,) + tuple(input_shape[1:]), slope.shape)
        except ValueError:
            shape = None
        # The slope broadcasts to x per sample: it may not have the batch axis (or has size 1 there).
        if shape != (2,) + tuple(input_shape[1:]) or (slope.ndim == rank and slope.shape[0] != 1):
            raise GraphError(f"node {node.name!r} (PRelu): slope of shape {list(slope.shape)} does not broadcast "
                             f"to the input {list(input_shape)} per sample")
    return slope


def _prelu_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _slope(node, input_shapes[0])
    return [input_shapes[0]]


def _prelu_reference(node, inputs):
    x = inputs[0]
    return [np.where(x >= 0, x, _slope(node).astype(np.float64) * x)]


def _prelu_make_kernel(node):
    slope = _slope(node)

    def run(inputs):
        x = np.asarray(inputs[0], dtype=np.float32)
        return [np.where(x >= 0, x, slope * x).astype(np.float32, copy=False)]

    return run


def _prelu_cost(node, input_shapes, output_shapes):
    cost = _unary_cost(node, input_shapes, output_shapes)
    return type(cost)(flops=cost.flops, float_flops=cost.float_flops, float32_params=int(node.params["slope"].size))


register(Op("PRelu", "x if x >= 0 else slope * x (slope broadcast per sample)", _prelu_infer_shapes,
            _prelu_reference, _prelu_make_kernel, _prelu_cost, parameters=("slope",)))


# ---- LogSoftmax -----------------------------------------------------------------------------

def _log_softmax(x, axis):
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _log_softmax_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _softmax_axis(node, len(input_shapes[0]))
    return [input_shapes[0]]


def _log_softmax_reference(node, inputs):
    return [_log_softmax(inputs[0], _softmax_axis(node, inputs[0].ndim))]


def _log_softmax_make_kernel(node):
    return lambda inputs: [_log_softmax(np.asarray(inputs[0], np.float32),
                                        _softmax_axis(node, inputs[0].ndim)).astype(np.float32)]


register(Op("LogSoftmax", "log of softmax over one non-batch axis", _log_softmax_infer_shapes,
            _log_softmax_reference, _log_softmax_make_kernel, _unary_cost, attributes=("axis",)))
