"""ElementwiseChain (plan-only): a chain of per-element ops on one 4-D tensor in one pass.

A Session's plan (engine/fusion.py: fuse_elementwise_chains) replaces a chain such as MobileNetV3's
hard-swish, x -> x + 3 -> Clip(0, 6) -> x * that -> / 6, by one node: the stored ops' float32
operations in the same order, element by element, so the results are the same bits, but each
element is read and written once instead of once per op, with no intermediate tensors.

config: an `ElementwiseSteps`. Input: float32 [B, C, H, W] (x). Output: the same shape.
Each step computes v = f(v) from the value v so far (x at the start) and, per channel c, two
float32 constants a[c], b[c]:

    AFFINE      v * a + b        (ChannelAffine; HardSigmoid's alpha * v + beta)
    CLIP        min(max(v, a), b) (Clip; Relu with a = 0 and b = inf)
    CLAMP       np.clip(v, a, b)  (HardSigmoid's clip to [0, 1]: v itself where it equals a bound)
    MUL, DIV, SUB        v op a  (Mul/Div/Sub with a constant; an added constant is a ChannelAffine)
    MUL_FIRST, DIV_FIRST, SUB_FIRST   a op v  (the constant first)
    MUL_X, DIV_X, SUB_X, ADD_X        v op x;  X_DIV, X_SUB: x op v (the chain's input x)

max and min are numpy's maximum and minimum (NaN propagates; of two equal values, +0 and -0, the
bound); division follows IEEE (x / 0 = inf).
"""
from dataclasses import dataclass

import numpy as np
from numba import prange

from ..errors import GraphError
from ..jit import parallel_ieee_jit
from . import _attrs
from .registry import Cost, Op, register

(AFFINE, CLIP, CLAMP, MUL, DIV, SUB, MUL_FIRST, DIV_FIRST, SUB_FIRST, MUL_X, DIV_X, SUB_X, ADD_X, X_DIV,
 X_SUB) = range(15)


@dataclass(frozen=True, eq=False)
class ElementwiseSteps:
    """codes: int64 [S] (the step constants above); constants: float32 [S, 2, C] (a and b of each
    step per channel, unused ones 0); sources: the names of the stored nodes, in order."""

    codes: np.ndarray
    constants: np.ndarray
    sources: tuple


def _infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _attrs.expect_rank(node, 0, input_shapes[0], 4)
    steps = node.config
    if steps.constants.shape[2] != input_shapes[0][1]:
        raise GraphError(f"node {node.name!r} (ElementwiseChain): constants for {steps.constants.shape[2]} channels, "
                         f"input has {input_shapes[0][1]}")
    return [input_shapes[0]]


# The two-operand steps: code -> (numpy function, its operands: v the value so far, a the constant,
# x the chain's input).
_BINARY_STEPS = {MUL: (np.multiply, "va"), DIV: (np.divide, "va"), SUB: (np.subtract, "va"),
                 MUL_FIRST: (np.multiply, "av"), DIV_FIRST: (np.divide, "av"), SUB_FIRST: (np.subtract, "av"),
                 MUL_X: (np.multiply, "vx"), DIV_X: (np.divide, "vx"), SUB_X: (np.subtract, "vx"),
                 ADD_X: (np.add, "vx"), X_DIV: (np.divide, "xv"), X_SUB: (np.subtract, "xv")}


def _step_reference(code, value, x, a, b):
    """One step in float64 over arrays broadcast per channel (the reference of the chain)."""
    if code == AFFINE:
        return value * a + b
    if code == CLIP:
        return np.minimum(np.maximum(value, a), b)
    if code == CLAMP:
        return np.clip(value, a, b)
    function, order = _BINARY_STEPS[code]
    operands = {"v": value, "a": a, "x": x}
    with np.errstate(divide="ignore", invalid="ignore"):
        return function(operands[order[0]], operands[order[1]])


def _reference(node, inputs):
    x = np.asarray(inputs[0], dtype=np.float64)
    steps = node.config
    value = x
    for code, (a, b) in zip(steps.codes, steps.constants.astype(np.float64)):
        value = _step_reference(int(code), value, x, a[None, :, None, None], b[None, :, None, None])
    return [value]


@parallel_ieee_jit
def chain_kernel(x, codes, constants, y):
    """y[b, c] = the steps applied to x[b, c] (float32 [B, C, pixels] both), one (b, c) row per
    parallel iteration; each step is one loop over the row, so it vectorizes."""
    batch, channels, pixels = x.shape
    for row in prange(batch * channels):
        b, c = row // channels, row % channels
        source, value = x[b, c], y[b, c]
        for i in range(pixels):
            value[i] = source[i]
        for s in range(codes.shape[0]):
            code, a, bound = codes[s], constants[s, 0, c], constants[s, 1, c]
            if code == AFFINE:
                for i in range(pixels):
                    value[i] = value[i] * a + bound
            elif code == CLIP:
                for i in range(pixels):
                    v = value[i]
                    v = v if v > a or v != v else a  # as np.maximum: NaN stays, a tie gives the bound
                    value[i] = v if v < bound or v != v else bound
            elif code == CLAMP:
                for i in range(pixels):
                    v = value[i]
                    v = a if v < a else v
                    value[i] = bound if v > bound else v
            elif code == MUL:
                for i in range(pixels):
                    value[i] = value[i] * a
            elif code == DIV:
                for i in range(pixels):
                    value[i] = value[i] / a
            elif code == SUB:
                for i in range(pixels):
                    value[i] = value[i] - a
            elif code == MUL_FIRST:
                for i in range(pixels):
                    value[i] = a * value[i]
            elif code == DIV_FIRST:
                for i in range(pixels):
                    value[i] = a / value[i]
            elif code == SUB_FIRST:
                for i in range(pixels):
                    value[i] = a - value[i]
            elif code == MUL_X:
                for i in range(pixels):
                    value[i] = value[i] * source[i]
            elif code == DIV_X:
                for i in range(pixels):
                    value[i] = value[i] / source[i]
            elif code == SUB_X:
                for i in range(pixels):
                    value[i] = value[i] - source[i]
            elif code == ADD_X:
                for i in range(pixels):
                    value[i] = value[i] + source[i]
            elif code == X_DIV:
                for i in range(pixels):
                    value[i] = source[i] / value[i]
            else:  # X_SUB
                for i in range(pixels):
                    value[i] = source[i] - value[i]


def _make_kernel(node):
    steps = node.config
    codes = np.ascontiguousarray(steps.codes, dtype=np.int64)
    constants = np.ascontiguousarray(steps.constants, dtype=np.float32)

    def run(inputs, out=None):
        x = np.ascontiguousarray(inputs[0], dtype=np.float32)
        y = np.empty(x.shape, np.float32) if out is None or not out.flags.c_contiguous else out
        shape = (x.shape[0], x.shape[1], -1)
        chain_kernel(x.reshape(shape), codes, constants, y.reshape(shape))
        return [y]

    return run


def _cost(node, input_shapes, output_shapes):
    flops = len(node.config.codes) * int(np.prod(input_shapes[0][1:]))
    return Cost(flops=flops, float_flops=flops)


register(Op("ElementwiseChain", "per-element ops on one tensor in one pass (plan-only)", _infer_shapes, _reference,
            _make_kernel, _cost, output_buffer=True, plan_only=True))
