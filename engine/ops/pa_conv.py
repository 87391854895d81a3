"""PAConv and PALinear: piecewise-approximated multi-base binary convolution / linear layer.

    y = activation(conv(Qw(W), Qa(x)) + b + residual)     (epilogue: engine/ops/_epilogue.py)

Qw, per output channel o (M sign bit-planes B_k in {-1, +1}):
    Qw(W)[o] = weight_offset[o] + sum_k weight_scales[k, o] * B_k[o]
Qa, per input tensor, with N thresholds act_thresholds [N, C] and P activation bit-planes
A_p in {0, 1}, each weighted by its act_steps[p]:
    Qa(x)[c] = act_lowest + sum_p act_steps[p] * A_p(x[c])
attr act_coding (absent: "thermometer") says what the planes hold (engine/bits.py):
- "thermometer": P = N, A_j(x[c]) = (x[c] >= act_thresholds[j, c]); any steps.
- "binary": P = B = ceil(log2(N + 1)), A_b(x[c]) = bit b of q = #{j : x[c] >= act_thresholds[j, c]},
  and act_steps[b] = e * 2^b (exactly, in float32) for one step e: Qa(x) = act_lowest + e * q,
  the values of a thermometer code with N equal steps e in B instead of N planes (PA(4, 5): 4 x 3
  binary convolutions instead of 4 x 5).
The combine below runs over the planes with their own steps, so both codes share it; only the
packing (and a producer's hand-off of planes, engine/plan.py) differ.
Padding rules (attr padding_rule; DESIGN.md section 2), what a padded position holds:
- "zero_before_quantizer" (the default): the real-valued input is zero-padded before Qa, so a
  padded position holds Qa(0).
- "value_before_quantizer" (attr pad_value, a finite number used as float32): the real-valued
  input is padded with pad_value before Qa, so a padded position holds Qa(pad_value). This is
  an explicit Pad(-1 or +1) of an already binary tensor (pad_value is then any input that
  quantizes to that level).
- "zero_after_quantizer": the input is quantized first and the quantized tensor zero-padded, so a
  padded position holds 0 and contributes nothing (networks that binarize, then pad with 0).
  The kernel packs the bits of 0 into the padding like the default rule and subtracts, at each
  output position whose window crosses the border, what those padded taps added:
      y[o, oy, ox] -= sum over padded taps (c, ky, kx) of Qw(W)[o, c, ky, kx] * Qa(0)[c]
  The padded taps of a window depend only on its row pattern (which ky fall outside) and its
  column pattern (which kx fall outside), so the correction is precomputed per output channel
  for each (row pattern, column pattern) pair (`edge_corrections`) and added in the epilogue.

With L0 = weight_offset - sum_k weight_scales[k] (the lowest weight level) and B_k = 2 b_k - 1,
summing over the K = C*kh*kw taps of a window:
    y[o] = b[o] + L0[o]*act_lowest*K + act_lowest * sum_k 2 d_k[o] popcount(b_k[o])
           + L0[o] * sum_p e_p popcount(a_p) + sum_k sum_p 2 d_k[o] e_p popcount(b_k[o] & a_p)
(e_p = act_steps[p], a_p the activation planes of either code).
Every popcount is an exact integer; only this final combine rounds (in float64, then to float32).

Groups (attr group, default 1; it divides C and O), as in a float Conv: output channel o of
group g = o // (O/group) reads only the input channels g*C/group .. (g+1)*C/group - 1, so the
sums above run over its group's K = (C/group)*kh*kw taps. In the packed layout
(engine/bits.py) each group's channels start at a word boundary and a weight plane covers only
its group's words_for(C/group) words; the kernel runs the micro-kernel per group on that group's
window words and its blocks of O/group output channels (padded to 16 per group). A depthwise
conv (C/group = 1) thus uses one bit of each 64-bit word and 16 output slots for its one
channel: correct, but far more popcount work than a channel-packed depthwise kernel would need.

In a Session's plan (engine/plan.py) a PAConv runs as two plan-only steps: PackPlanes
(engine/ops/pack_planes.py) packs its input, BinaryConv (engine/ops/binary_conv.py) convolves the
planes; a BinaryConv whose output goes to other binary layers writes their planes from its
epilogue, and they skip the packing. Both run the kernel of engine/ops/_binary_conv_kernel.py
through `binary_conv_runner`, as this op's own kernel does.

attrs: in_channels, group, strides, pads [top, left, bottom, right], dilations, padding_rule,
       pad_value, act_coding.
params: weight_planes uint64 [M, O, kh, kw, words_for(C/group)], weight_scales float32 [M, O],
        weight_offset float32 [O], act_thresholds float32 [N, C], act_steps float32 [P],
        act_lowest float32 [1], bias float32 [O].
PALinear is the same with kh = kw = 1 and group 1 on [batch, C] inputs (no geometry attributes).
"""
import numba
import numpy as np

from ..bits import ACT_CODINGS, PlanesLayout, activation_planes, unpack_weight_planes, words_for
from ..errors import GraphError
from ..popcount_block import DIRECT_CHANNELS
from . import _attrs, _epilogue
from ._binary_conv_kernel import (ConvShape, PlanesWriter, PreparedWeights, binary_conv_kernel, no_epilogue_inputs,
                                  no_planes_output, work_split)
from .conv import conv_geometry, padded_input_and_columns_bytes, window_view
from .registry import Cost, Op, kept, register

PADDING_RULES = ("zero_before_quantizer", "value_before_quantizer", "zero_after_quantizer")
# What a .pab file may hold.
STORED_ATTRIBUTES = ("in_channels", "padding_rule", "pad_value", "activation", "act_coding")
STORED_PARAMETERS = ("weight_planes", "weight_scales", "weight_offset", "act_thresholds", "act_steps", "act_lowest",
                     "bias")


def _params(node):
    """All PA parameters, validated against each other; returns a dict of arrays."""
    p = {
        "weight_planes": _attrs.param(node, "weight_planes", np.uint64, 5),
        "weight_scales": _attrs.param(node, "weight_scales", np.float32, 2),
        "weight_offset": _attrs.param(node, "weight_offset", np.float32, 1),
        "act_thresholds": _attrs.param(node, "act_thresholds", np.float32, 2),
        "act_steps": _attrs.param(node, "act_steps", np.float32, 1),
        "act_lowest": _attrs.param(node, "act_lowest", np.float32, 1),
        "bias": _attrs.param(node, "bias", np.float32, 1),
    }
    in_channels = node.attrs.get("in_channels")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise GraphError(f"node {node.name!r} ({node.op}): attribute 'in_channels' must be a positive int")
    padding_rule(node)
    coding = act_coding(node)
    m, out_channels, kh, kw, n_words = p["weight_planes"].shape
    n = p["act_thresholds"].shape[0]
    if m < 1 or n < 1 or out_channels < 1 or kh < 1 or kw < 1:
        raise GraphError(f"node {node.name!r} ({node.op}): empty weight_planes or act_thresholds")
    group = node.attrs.get("group", 1)
    if not _attrs.is_int(group) or group < 1 or in_channels % group or out_channels % group:
        raise GraphError(f"node {node.name!r} ({node.op}): group must be a positive int dividing in_channels "
                         f"{in_channels} and output channels {out_channels}, found {group!r}")
    if node.op == "PALinear" and group != 1:
        raise GraphError(f"node {node.name!r} (PALinear): group must be 1, found {group!r}")
    group_channels = in_channels // group
    _attrs.expect_shape(node, f"weight_planes (words_for({group_channels}) words per output channel for "
                        f"in_channels {in_channels}, group {group})", p["weight_planes"].shape,
                        (m, out_channels, kh, kw, words_for(group_channels)))
    _attrs.expect_shape(node, "weight_scales", p["weight_scales"].shape, (m, out_channels))
    _attrs.expect_shape(node, "weight_offset", p["weight_offset"].shape, (out_channels,))
    _attrs.expect_shape(node, "act_thresholds", p["act_thresholds"].shape, (n, in_channels))
    _attrs.expect_shape(node, f"act_steps (one step per activation plane of the {coding} code of {n} thresholds)",
                        p["act_steps"].shape, (activation_planes(n, coding),))
    _attrs.expect_shape(node, "act_lowest", p["act_lowest"].shape, (1,))
    _attrs.expect_shape(node, "bias", p["bias"].shape, (out_channels,))
    if group_channels % 64 and np.any(p["weight_planes"][..., -1] >> np.uint64(group_channels % 64)):
        what = f"in_channels {in_channels}" if group == 1 else f"the {group_channels} channels of its group"
        raise GraphError(f"node {node.name!r} ({node.op}): weight_planes has bits set past {what} "
                         f"in its last word (they must be 0)")
    for key in ("weight_scales", "weight_offset", "act_thresholds", "act_steps", "act_lowest", "bias"):
        if not np.all(np.isfinite(p[key])):
            raise GraphError(f"node {node.name!r} ({node.op}): parameter {key!r} holds NaN or Inf")
    if coding == "binary":
        steps = p["act_steps"]
        expected = binary_plane_steps(steps[0], n)
        if not np.array_equal(steps, expected) or not np.all(np.isfinite(expected)):
            raise GraphError(f"node {node.name!r} ({node.op}): act_coding 'binary' needs act_steps e * 2^b "
                             f"(b = 0..{len(steps) - 1}), expected {expected.tolist()}, found {steps.tolist()}")
    return p


def act_coding(node):
    """The node's activation code, "thermometer" (when the attribute is absent) or "binary"."""
    coding = node.attrs.get("act_coding", "thermometer")
    if not isinstance(coding, str) or coding not in ACT_CODINGS:
        raise GraphError(f"node {node.name!r} ({node.op}): act_coding {coding!r} is not supported; "
                         f"supported: {ACT_CODINGS}")
    return coding


def binary_plane_steps(step, n_thresholds):
    """float32 [B]: the plane weights e * 2^b of the binary code of N thresholds with step e
    (exact: a float32 times a power of two)."""
    b = np.arange(activation_planes(n_thresholds, "binary"))
    with np.errstate(over="ignore"):
        return (np.float32(step) * (2.0 ** b).astype(np.float32)).astype(np.float32)


def padding_rule(node):
    """(rule, pad value before Qa as float32) of a PA node; see the module docstring.

    The pad value is 0 for "zero_before_quantizer" and for "zero_after_quantizer" (whose kernel
    packs the bits of 0 into the padding, then corrects the border outputs)."""
    rule = node.attrs.get("padding_rule", "zero_before_quantizer")
    if not isinstance(rule, str) or rule not in PADDING_RULES:
        raise GraphError(
            f"node {node.name!r} ({node.op}): padding_rule {rule!r} is not supported; supported: {PADDING_RULES}"
        )
    if rule != "value_before_quantizer":
        if "pad_value" in node.attrs:
            raise GraphError(f"node {node.name!r} ({node.op}): attribute 'pad_value' is only used by padding_rule "
                             f"'value_before_quantizer', found it with {rule!r}")
        return rule, np.float32(0.0)
    value = node.attrs.get("pad_value")
    if not _attrs.is_finite_number(value) or abs(value) > float(np.finfo(np.float32).max):
        raise GraphError(f"node {node.name!r} ({node.op}): padding_rule 'value_before_quantizer' needs a finite "
                         f"float32 number 'pad_value', found {value!r}")
    return rule, np.float32(value)


def group_of(node):
    """The node's group count (1 when the attribute is absent)."""
    return node.attrs.get("group", 1)


def weight_values(node):
    """Qw(W) as float64 [O, C/group, kh, kw] (the layout of a float Conv's weight)."""
    p = _params(node)
    group_channels = node.attrs["in_channels"] // group_of(node)
    signs = np.where(unpack_weight_planes(p["weight_planes"], group_channels), 1.0, -1.0)
    scales = p["weight_scales"].astype(np.float64)
    return p["weight_offset"].astype(np.float64)[:, None, None, None] + np.einsum("mo,mocij->ocij", scales, signs)


def act_quantize(x, thresholds, steps, lowest, coding="thermometer"):
    """Qa(x), float64, shape of x (channel axis 1), from the definition of each code:
    "thermometer": lowest + sum_j steps[j] * (x[:, c] >= thresholds[j, c]);
    "binary": lowest + sum_b steps[b] * ((q >> b) & 1), q = #{j : x[:, c] >= thresholds[j, c]}."""
    x = np.asarray(x, dtype=np.float64)
    extra = (1,) * (x.ndim - 2)
    result = np.full(x.shape, float(lowest[0]))
    passed = [x >= thresholds[j].astype(np.float64).reshape((1, -1) + extra) for j in range(thresholds.shape[0])]
    if coding == "binary":
        level = np.sum(passed, axis=0, dtype=np.int64)
        for b in range(len(steps)):
            result += float(steps[b]) * ((level >> b) & 1)
        return result
    for j in range(thresholds.shape[0]):
        result += float(steps[j]) * passed[j]
    return result


# ---- PAConv -------------------------------------------------------------------------------

def _conv_infer_shapes(node, input_shapes):
    _epilogue.check_arity(node)
    _attrs.expect_rank(node, 0, input_shapes[0], 4)
    p = _params(node)
    if input_shapes[0][1] != node.attrs["in_channels"]:
        raise GraphError(
            f"node {node.name!r} (PAConv): input has {input_shapes[0][1]} channels, "
            f"in_channels is {node.attrs['in_channels']}"
        )
    _, out_channels, kh, kw, _ = p["weight_planes"].shape
    _, _, _, (out_h, out_w) = conv_geometry(node, input_shapes[0], (kh, kw))
    output_shape = (None, out_channels, out_h, out_w)
    _epilogue.check(node, input_shapes, output_shape)
    return [output_shape]


def _conv_reference(node, inputs):
    """Qa and padding in the order of the padding rule, a float64 convolution with Qw(W), then
    the epilogue."""
    x = inputs[0]
    p = _params(node)
    rule, pad_value = padding_rule(node)
    _, pads, _, _ = conv_geometry(node, x.shape, p["weight_planes"].shape[2:4])
    widths = ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3]))
    coding = act_coding(node)
    if rule == "zero_after_quantizer":
        quantized = np.pad(act_quantize(x, p["act_thresholds"], p["act_steps"], p["act_lowest"], coding), widths)
    else:
        padded = np.pad(x, widths, constant_values=float(pad_value))
        quantized = act_quantize(padded, p["act_thresholds"], p["act_steps"], p["act_lowest"], coding)
    y = padded_conv_reference(node, quantized)
    return [_epilogue.apply(node, y + p["bias"].astype(np.float64)[None, :, None, None], inputs)]


def padded_conv_reference(node, quantized):
    """float64 [B, O, out_h, out_w]: the grouped convolution of the quantized, already padded input
    [B, C, H + top + bottom, W + left + right] with Qw(W), in float64 (no bias or epilogue)."""
    weight = weight_values(node)
    strides = _attrs.int_list(node, "strides", 2, 1, default=[1, 1])
    dilations = _attrs.int_list(node, "dilations", 2, 1, default=[1, 1])
    windows = window_view(quantized, weight.shape[2:], strides, [0, 0, 0, 0], dilations)
    group = group_of(node)
    group_in, group_out = quantized.shape[1] // group, weight.shape[0] // group
    return np.concatenate([np.einsum("bcijhw,ocij->bohw", windows[:, g * group_in:(g + 1) * group_in],
                                     weight[g * group_out:(g + 1) * group_out]) for g in range(group)], axis=1)


def combine_coefficients(p, in_channels):
    """Per-output constants of the combine (see module docstring), float64. in_channels: the
    channels one output reads (C/group).

    -> (constant [O], lowest_weight [O], pair_scales [M, N, O] = 2 d_k e_j, act_steps [N])
    """
    scales = p["weight_scales"].astype(np.float64)
    lowest_weight = p["weight_offset"].astype(np.float64) - scales.sum(axis=0)
    steps = p["act_steps"].astype(np.float64)
    act_lowest = float(p["act_lowest"][0])
    _, _, kh, kw, _ = p["weight_planes"].shape
    taps = in_channels * kh * kw
    planes = p["weight_planes"]
    weight_ones = np.unpackbits(np.ascontiguousarray(planes).view(np.uint8).reshape(planes.shape[:2] + (-1,)),
                                axis=-1).sum(axis=-1)  # popcount of each [k, o] plane
    constant = (
        p["bias"].astype(np.float64)
        + lowest_weight * act_lowest * taps
        + act_lowest * (2.0 * scales * weight_ones).sum(axis=0)
    )
    pair_scales = 2.0 * scales[:, None, :] * steps[None, :, None]
    return constant, lowest_weight, np.ascontiguousarray(pair_scales), steps


def _taps_outside(out_size, kernel, stride, dilation, pad_before, in_size):
    """bool [out_size, kernel]: tap k of output index i reads padding (outside 0..in_size-1)."""
    positions = np.arange(out_size)[:, None] * stride + np.arange(kernel)[None, :] * dilation - pad_before
    return (positions < 0) | (positions >= in_size)


def edge_corrections(node, input_hw):
    """The border correction of padding rule "zero_after_quantizer" for inputs of height x width
    `input_hw`: the kernel pads with the bits of 0 (Qa(0)), so an output adds
    sum over its padded taps of Qw(W)[o, c, ky, kx] * Qa(0)[c], which this removes.

    -> (row_patterns int64 [out_h], column_patterns int64 [out_w], corrections float64 [R, O, S])
       with y[b, o, oy, ox] += corrections[row_patterns[oy], o, column_patterns[ox]]: R row
       patterns (sets of ky outside the input), S column patterns; the pattern with no padded tap
       has a correction of 0. None when Qa(0) is 0 in every channel (nothing to correct).
    """
    p = _params(node)
    in_channels = node.attrs["in_channels"]
    zero_level = act_quantize(np.zeros((1, in_channels)), p["act_thresholds"], p["act_steps"], p["act_lowest"],
                              act_coding(node))[0]
    if not np.any(zero_level):
        return None
    weight = weight_values(node)  # [O, C/group, kh, kw]
    out_channels, group_channels, kh, kw = weight.shape
    group = group_of(node)
    # What one padded tap (ky, kx) adds to output o: a sum over the channels of o's group only.
    tap_sums = np.einsum("gocij,gc->goij", weight.reshape(group, out_channels // group, group_channels, kh, kw),
                         zero_level.reshape(group, group_channels)).reshape(out_channels, kh, kw)
    strides, pads, dilations, (out_h, out_w) = conv_geometry(node, (1, in_channels) + tuple(input_hw), (kh, kw))
    rows = _taps_outside(out_h, kh, strides[0], dilations[0], pads[0], input_hw[0])
    columns = _taps_outside(out_w, kw, strides[1], dilations[1], pads[1], input_hw[1])
    row_masks, row_patterns = np.unique(rows, axis=0, return_inverse=True)
    column_masks, column_patterns = np.unique(columns, axis=0, return_inverse=True)
    padded_taps = row_masks[:, None, :, None] | column_masks[None, :, None, :]  # [R, S, kh, kw]
    corrections = -np.einsum("rsij,oij->ros", padded_taps.astype(np.float64), tap_sums)
    return (np.ascontiguousarray(row_patterns.reshape(-1), dtype=np.int64),
            np.ascontiguousarray(column_patterns.reshape(-1), dtype=np.int64), np.ascontiguousarray(corrections))


def output_slots(out_channels, group):
    """int64 [O]: the padded channel ("slot") of each output channel. Each group's O/group output
    channels are padded to a multiple of 16 (DIRECT_CHANNELS), so that a block of the micro-kernel
    never spans two groups; slot = g * group_slots + (o - g * O/group) for o in group g (the
    identity when group is 1)."""
    group_out = out_channels // group
    group_slots = -(-group_out // DIRECT_CHANNELS) * DIRECT_CHANNELS
    o = np.arange(out_channels)
    return (o // group_out) * group_slots + o % group_out


def interleave_weight_planes(weight_planes, group=1):
    """Weight words in the micro-kernel's order: [M, blocks, kh*kw*words, 16] flattened, block b
    holding the slots 16b .. 16b+15 (see `output_slots`): word t of a block's 16 channels is 16
    consecutive uint64, two 512-bit vectors.

    The padding slots hold zero words (they count nothing and are never written out)."""
    m_planes, out_channels, kh, kw, n_words = weight_planes.shape
    slots = output_slots(out_channels, group)
    blocks = group * (-(-(out_channels // group) // DIRECT_CHANNELS))
    padded = np.zeros((m_planes, blocks * DIRECT_CHANNELS, kh * kw * n_words), dtype=np.uint64)
    padded[:, slots] = weight_planes.reshape(m_planes, out_channels, -1)
    return np.ascontiguousarray(padded.reshape(m_planes, blocks, DIRECT_CHANNELS, -1).transpose(0, 1, 3, 2)).ravel()


def input_layout(node):
    """The PlanesLayout (engine/bits.py) a PAConv packs its float32 input into: its activation
    thresholds and code, its pads and the pad value of its padding rule, its group."""
    p = _params(node)
    _, pad_value = padding_rule(node)
    return PlanesLayout(np.ascontiguousarray(p["act_thresholds"], dtype=np.float32), act_coding(node),
                        tuple(int(pad) for pad in node.attrs.get("pads", (0, 0, 0, 0))), float(pad_value),
                        group_of(node))


def prepare_weights(node):
    """The kernel's PreparedWeights (engine/ops/_binary_conv_kernel.py) of a PAConv/PALinear: weight
    words interleaved by 16-channel block, and the combine coefficients by output slot (zero for
    the padding slots: the combine runs over whole blocks)."""
    p = _params(node)
    group = group_of(node)
    m_planes, out_channels, kh, kw, n_words = p["weight_planes"].shape
    interleaved = interleave_weight_planes(p["weight_planes"], group)
    constant, lowest_weight, pair_scales, steps = combine_coefficients(p, node.attrs["in_channels"] // group)
    slots = output_slots(out_channels, group)
    padded_channels = len(interleaved) // (m_planes * kh * kw * n_words)
    by_slot = []
    for values in (constant, lowest_weight, pair_scales):
        padded = np.zeros(values.shape[:-1] + (padded_channels,))
        padded[..., slots] = values
        by_slot.append(padded)
    constant, lowest_weight, pair_scales = by_slot
    slot_channels = np.full(padded_channels, -1, dtype=np.int64)
    slot_channels[slots] = np.arange(out_channels)
    return PreparedWeights(interleaved, m_planes, slot_channels, constant, lowest_weight,
                           np.ascontiguousarray(pair_scales).ravel(), steps,
                           bool(np.array_equal(slots, np.arange(out_channels))))


def binary_conv_runner(node, planes_pads=None, output_layout=None, writes_float=True):
    """run(inputs, out=None) -> outputs: the binary convolution of PAConv `node` (its epilogue,
    residual and ReLU included) over its input's bit-planes.

    inputs: [planes uint64 (engine/bits.py layout, packed by `input_layout(node)` but padded by
    `planes_pads`, default the node's own pads, each side at least as much), optional residual
    float32]. outputs: [float32 y] without `output_layout`; with it (the PlanesLayout of the
    reader the output goes to), [the reader's planes], or [y, the planes] when `writes_float`.
    `out`: a float32 array of y's shape to write y into. `state`: None, or the dict a Session keeps
    for this step (registry.Op.keeps_state): the planes it writes go into the same array every run,
    and a run with the same input, residual and `out` arrays as the last, at the same thread count,
    repeats the last kernel call as it was (its arguments built once)."""
    # The kernel gets its argument groups as plain tuples: numba types a named tuple in Python, which
    # cost microseconds per call (measured 2.5 us more for two named tuples of 7 arrays).
    prepared = prepare_weights(node)
    weights = tuple(prepared)
    m_planes, out_channels, kh, kw, _ = node.params["weight_planes"].shape
    group = group_of(node)
    rule, _ = padding_rule(node)
    relu = node.attrs.get("activation") == "relu"
    own_pads = tuple(node.attrs.get("pads", (0, 0, 0, 0)))
    planes_pads = own_pads if planes_pads is None else tuple(planes_pads)
    origin = (planes_pads[0] - own_pads[0], planes_pads[1] - own_pads[1])
    writer = PlanesWriter(output_layout, prepared) if output_layout is not None else None
    no_output = np.zeros((1, 1, 1), dtype=np.float32)
    no_planes = tuple(no_planes_output())
    blocks = len(prepared.slot_channels) // DIRECT_CHANNELS
    per_shape = {}  # (input planes shape, threads) -> what depends on them only, validated once

    def setup(planes_shape, threads):
        """(output shape, its [batch, O, pixels] matrix shape, ConvShape, Epilogue without residual,
        the shape of the planes written) for input planes of this shape and this many threads."""
        top, left, bottom, right = planes_pads
        shape = (planes_shape[1], node.attrs["in_channels"], planes_shape[2] - top - bottom,
                 planes_shape[3] - left - right)
        strides, pads, dilations, (out_h, out_w) = conv_geometry(node, shape, (kh, kw))
        rows_per_chunk, blocks_per_split = work_split(shape[0], out_h, out_w, blocks, group,
                                                      writer is None or writer.group_channels % 64 == 0, threads)
        geometry = ConvShape(kh, kw, strides[0], strides[1], dilations[0], dilations[1], origin[0], origin[1], group,
                             out_h, out_w, out_channels, rows_per_chunk, blocks_per_split)
        epilogue = no_epilogue_inputs(relu)
        correction = edge_corrections(node, shape[2:]) if rule == "zero_after_quantizer" and any(pads) else None
        if correction is not None:
            row_patterns, column_patterns, corrections = correction
            epilogue = epilogue._replace(has_correction=True, row_patterns=row_patterns,
                                         column_patterns=column_patterns, corrections=corrections)
        planes_out_shape = None if writer is None else writer.planes_shape(shape[0], out_h, out_w)
        return ((shape[0], out_channels, out_h, out_w), (shape[0], out_channels, out_h * out_w), tuple(geometry),
                tuple(epilogue), planes_out_shape)

    def run(inputs, out=None, state=None):
        # What a run does beyond the kernel is a few microseconds per layer: the arrays the plan
        # hands over are used as they are, and what depends on the shapes only is made once. In a
        # Session, a run like the last one only calls the kernel (Python between the kernels runs
        # with cold caches: the 19 binary layers of ResNet-18 spent 0.25 ms a run here).
        threads = numba.get_num_threads()
        if state is not None:
            last = state.get("call")
            if last is not None and last[0] is inputs[0] and last[1] is inputs[-1] and last[2] is out \
                    and last[3] == threads:
                binary_conv_kernel(*last[4])
                return last[5]
        planes = inputs[0]
        if not planes.flags.c_contiguous:
            planes = np.ascontiguousarray(planes)
        key = (planes.shape, threads)
        if key not in per_shape:
            per_shape[key] = setup(*key)
        output_shape, matrix_shape, geometry, epilogue, planes_out_shape = per_shape[key]
        y = None
        if writer is None or writes_float:
            y = out
            if out is None or not out.flags.c_contiguous:  # the kernel writes rows of whole channels
                y = np.empty(output_shape, dtype=np.float32)
        planes_output = no_planes
        if writer is not None:
            planes_out = kept(state, "planes", planes_out_shape, lambda: np.empty(planes_out_shape, dtype=np.uint64))
            planes_output = writer.output(planes_out, writes_float)
        if len(inputs) == 2:  # rows flattened: a chunk's pixels (whole rows) are one slice of a channel
            residual = inputs[1]
            if residual.dtype != np.float32 or not residual.flags.c_contiguous:
                residual = np.ascontiguousarray(residual, dtype=np.float32)
            epilogue = (residual.reshape(matrix_shape), True) + epilogue[2:]
        # A call that reads the arrays as given and writes y into `out` itself can be repeated as it is.
        repeatable = planes is inputs[0] and (len(inputs) == 1 or residual is inputs[1]) and y is out
        arguments = (planes, planes.reshape(-1), geometry, weights, epilogue, planes_output,
                     no_output if y is None else y.reshape(matrix_shape))
        binary_conv_kernel(*arguments)
        if y is None:
            outputs = [planes_output[0]]
        else:
            if out is not None and y is not out:
                out[...] = y
                y = out
            outputs = [y] if writer is None else [y, planes_output[0]]
        if state is not None and repeatable:
            state["call"] = (inputs[0], inputs[-1], out, threads, arguments, outputs)
        return outputs

    return run


def _conv_make_kernel(node):
    layout = input_layout(node)
    binary_conv = binary_conv_runner(node)

    def run(inputs, out=None):
        x = np.ascontiguousarray(inputs[0], dtype=np.float32)
        conv_geometry(node, x.shape, node.params["weight_planes"].shape[2:4])  # a GraphError before packing
        return binary_conv([layout.pack(x)] + list(inputs[1:]), out=out)

    return run


def _conv_cost(node, input_shapes, output_shapes):
    p = node.params
    m, out_channels, kh, kw, _ = p["weight_planes"].shape
    n = p["act_steps"].shape[0]  # activation planes: N (thermometer) or ceil(log2(N + 1)) (binary)
    in_channels = node.attrs["in_channels"] // group_of(node)  # the channels one output reads
    outputs = int(np.prod(output_shapes[0][1:]))
    macs = outputs * in_channels * kh * kw
    # one comparison per input element and threshold
    quantizer = p["act_thresholds"].shape[0] * int(np.prod(input_shapes[0][1:]))
    combine = outputs * (2 * (m * n + 1) + 1)
    return Cost(
        flops=quantizer + combine,
        bops=m * n * macs,
        float_flops=2 * macs + outputs,
        float32_params=out_channels * in_channels * kh * kw + out_channels,
    )


# ---- PALinear -----------------------------------------------------------------------------

def _as_conv_input(x):
    return x.reshape(x.shape[0], x.shape[1], 1, 1)


def _linear_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _attrs.expect_rank(node, 0, input_shapes[0], 2)
    p = _params(node)
    _, out_channels, kh, kw, _ = p["weight_planes"].shape
    if (kh, kw) != (1, 1) or input_shapes[0][1] != node.attrs["in_channels"]:
        raise GraphError(
            f"node {node.name!r} (PALinear): expects 1x1 weight planes and {node.attrs['in_channels']} "
            f"input features, found {kh}x{kw} and {input_shapes[0][1]}"
        )
    return [(None, out_channels)]


def _linear_reference(node, inputs):
    (y,) = _conv_reference(node, [_as_conv_input(inputs[0])])
    return [y[:, :, 0, 0]]


def _linear_make_kernel(node):
    conv_kernel = _conv_make_kernel(node)

    def run(inputs):
        # The batch becomes the width of one image row, so the micro-kernel's 8-pixel tiles are
        # filled with samples: [B, C] -> [1, C, 1, B] -> [1, O, 1, B] -> [B, O].
        x = inputs[0]
        (y,) = conv_kernel([np.ascontiguousarray(x.T).reshape(1, x.shape[1], 1, x.shape[0])])
        return [np.ascontiguousarray(y[0, :, 0, :].T)]

    return run


def _scratch_bytes(node, input_shapes, output_shapes):
    return padded_input_and_columns_bytes(node, input_shapes, output_shapes, node.params["weight_planes"].shape[2:4])


register(Op("PAConv", "multi-base binary 2-D convolution (M weight x N activation bit-planes)",
            _conv_infer_shapes, _conv_reference, _conv_make_kernel, _conv_cost, output_buffer=True,
            scratch_bytes=_scratch_bytes,
            attributes=STORED_ATTRIBUTES + ("group", "strides", "pads", "dilations"), parameters=STORED_PARAMETERS))
register(Op("PALinear", "multi-base binary fully connected layer",
            _linear_infer_shapes, _linear_reference, _linear_make_kernel, _conv_cost,
            attributes=STORED_ATTRIBUTES + ("group",), parameters=STORED_PARAMETERS))
