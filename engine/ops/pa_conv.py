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
packing (and a producer's hand-off of planes, engine/fusion.py) differ.
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

Bit-plane hand-off between binary layers (added when a Session plans a graph, never stored;
engine/fusion.py: hand_off_planes): with attrs["input_planes"] the node's input is already its
bit-planes (uint64, the layout of engine/bits.py, padded by its pads), written by the PAConv
before it, which has attrs["output_planes"] = {"pads", "pad_value", "group", "coding"} and
params["output_thresholds"] [N', O] of its reader and returns those planes instead of float32:
bit j of channel o is float32(y[o]) >= output_thresholds[j, o] after the epilogue (or, when
output_planes["coding"] is "binary", bit j of the count of those thresholds passed), exactly
what the reader would pack from the float32 output. A producer whose output has other readers
too (a residual Add fused into a later conv, a reader with other thresholds) has two outputs, the
float32 tensor and the planes (both with the float tensor's shape), and writes both in one
epilogue: the planes compare the same float32 values it stores. A reader whose planes were
padded for a reader that pads more has attrs["input_planes_pads"], their pads, and reads its
own padded input from inside them.

attrs: in_channels, group, strides, pads [top, left, bottom, right], dilations, padding_rule,
       pad_value, act_coding.
params: weight_planes uint64 [M, O, kh, kw, words_for(C/group)], weight_scales float32 [M, O],
        weight_offset float32 [O], act_thresholds float32 [N, C], act_steps float32 [P],
        act_lowest float32 [1], bias float32 [O].
PALinear is the same with kh = kw = 1 and group 1 on [batch, C] inputs (no geometry attributes).
"""
import numpy as np
from numba import prange

from ..bits import ACT_CODINGS, activation_planes, pack_activations, unpack_weight_planes, words_for
from ..errors import GraphError
from ..jit import parallel_jit, popcount64
from ..popcount_block import DIRECT_CHANNELS, DIRECT_PIXELS, popcount_direct_block
from . import _attrs, _epilogue
from .conv import conv_geometry, window_view
from .registry import Cost, Op, register

PADDING_RULES = ("zero_before_quantizer", "value_before_quantizer", "zero_after_quantizer")
# What a .pab file may hold; input_planes, output_planes and output_thresholds are plan-only.
STORED_ATTRIBUTES = ("in_channels", "padding_rule", "pad_value", "activation", "act_coding")
STORED_PARAMETERS = ("weight_planes", "weight_scales", "weight_offset", "act_thresholds", "act_steps", "act_lowest",
                     "bias")
TILE_PIXELS = 224  # output pixels of one work item of the kernel, about (whole rows; see work_split)
WORK_ITEMS = 8  # fewest work items a layer is split into when its channels allow (see work_split)


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
    # Two outputs only in a plan: float32 and the reader's planes (engine/fusion.py: hand_off_planes).
    outputs = 2 if node.attrs.get("output_planes") is not None and len(node.outputs) == 2 else 1
    _epilogue.check_arity(node, outputs)
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
    _epilogue.check(node, input_shapes, output_shape, outputs)
    return [output_shape] * outputs  # the planes tensor keeps the shape of the float tensor it codes


def _conv_reference(node, inputs):
    """Qa and padding in the order of the padding rule, a float64 convolution with Qw(W), then
    the epilogue."""
    x = inputs[0]
    p = _params(node)
    rule, pad_value = padding_rule(node)
    weight = weight_values(node)
    strides, pads, dilations, _ = conv_geometry(node, x.shape, weight.shape[2:])
    widths = ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3]))
    coding = act_coding(node)
    if rule == "zero_after_quantizer":
        quantized = np.pad(act_quantize(x, p["act_thresholds"], p["act_steps"], p["act_lowest"], coding), widths)
    else:
        padded = np.pad(x, widths, constant_values=float(pad_value))
        quantized = act_quantize(padded, p["act_thresholds"], p["act_steps"], p["act_lowest"], coding)
    windows = window_view(quantized, weight.shape[2:], strides, [0, 0, 0, 0], dilations)
    group = group_of(node)
    group_in, group_out = x.shape[1] // group, weight.shape[0] // group
    y = np.concatenate([np.einsum("bcijhw,ocij->bohw", windows[:, g * group_in:(g + 1) * group_in],
                                  weight[g * group_out:(g + 1) * group_out]) for g in range(group)], axis=1)
    return [_epilogue.apply(node, y + p["bias"].astype(np.float64)[None, :, None, None], inputs)]


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


def _conv_make_kernel(node):
    p = _params(node)
    group = group_of(node)
    m_planes, out_channels, kh, kw, n_words = p["weight_planes"].shape
    interleaved = interleave_weight_planes(p["weight_planes"], group)
    constant, lowest_weight, pair_scales, steps = combine_coefficients(p, node.attrs["in_channels"] // group)
    # Coefficients by slot, zero for the padding slots: the combine runs over whole 8-channel blocks.
    slots = output_slots(out_channels, group)
    padded_channels = len(interleaved) // (m_planes * kh * kw * n_words)
    by_slot = []
    for values in (constant, lowest_weight, pair_scales):
        padded = np.zeros(values.shape[:-1] + (padded_channels,))
        padded[..., slots] = values
        by_slot.append(padded)
    constant, lowest_weight, pair_scales = by_slot
    pair_scales = np.ascontiguousarray(pair_scales).ravel()
    slot_channels = np.full(padded_channels, -1, dtype=np.int64)
    slot_channels[slots] = np.arange(out_channels)
    thresholds = p["act_thresholds"]
    coding = act_coding(node)
    rule, pad_value = padding_rule(node)
    relu = node.attrs.get("activation") == "relu"
    no_residual = np.zeros((1, 1, 1, 1), dtype=np.float32)
    no_correction = (np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros((1, 1, 1)))
    corrections_by_size = {}  # (height, width) -> edge_corrections, for "zero_after_quantizer"
    input_planes = bool(node.attrs.get("input_planes"))
    # Planes padded more than this node pads (shared with a reader that pads more): read from origin.
    own_pads = tuple(node.attrs.get("pads", (0, 0, 0, 0)))
    planes_pads = tuple(node.attrs.get("input_planes_pads", own_pads))
    reader = _PlanesReader(node, out_channels) if node.attrs.get("output_planes") is not None else None
    float_output = reader is not None and len(node.outputs) == 2  # outputs [float32, planes] (engine/fusion.py)
    no_output = np.zeros((1, 1, 1, 1), dtype=np.float32)

    def run(inputs, out=None):
        origin = (0, 0)
        if input_planes:  # the bit-planes a PAConv producer wrote for this node (engine/fusion.py)
            planes = inputs[0]
            top, left, bottom, right = planes_pads
            shape = (planes.shape[1], node.attrs["in_channels"], planes.shape[2] - top - bottom,
                     planes.shape[3] - left - right)
            origin = (top - own_pads[0], left - own_pads[1])
        else:
            x = np.ascontiguousarray(inputs[0], dtype=np.float32)
            shape = x.shape
        strides, pads, dilations, (out_h, out_w) = conv_geometry(node, shape, (kh, kw))
        if not input_planes:
            planes = pack_activations(x, thresholds, pads, pad_value, group, coding)
        planes = np.ascontiguousarray(planes)
        rows_per_chunk, blocks_per_split = work_split(
            shape[0], out_h, out_w, padded_channels // DIRECT_CHANNELS, group,
            reader is None or reader.group_channels % 64 == 0)
        if reader is not None and not float_output:
            y = no_output
        else:
            y = out
            if out is None or not out.flags.c_contiguous:  # the kernel writes rows of whole channels
                y = np.empty((shape[0], out_channels, out_h, out_w), dtype=np.float32)
        if reader is not None:
            output_planes = reader.empty_planes(shape[0], out_h, out_w)
            planes_args = (output_planes, reader.thresholds, reader.binary, reader.pads[0], reader.pads[1],
                           reader.group_channels, float_output)
        else:
            planes_args = _NO_PLANES_ARGS
        has_residual = len(inputs) == 2
        residual = np.ascontiguousarray(inputs[1], dtype=np.float32) if has_residual else no_residual
        # Rows flattened: a chunk's pixels (whole rows) are one slice of a channel.
        flat_residual = residual.reshape(residual.shape[0], residual.shape[1], -1)
        correction = None
        if rule == "zero_after_quantizer" and any(pads):
            size = shape[2:]
            if size not in corrections_by_size:
                corrections_by_size[size] = edge_corrections(node, size)
            correction = corrections_by_size[size]
        row_patterns, column_patterns, corrections = no_correction if correction is None else correction
        _pa_conv_kernel(planes, planes.reshape(-1), interleaved, m_planes, kh, kw, strides[0], strides[1],
                        dilations[0], dilations[1], origin[0], origin[1], group, slot_channels, out_channels, constant,
                        lowest_weight, pair_scales, steps, flat_residual, has_residual, relu, correction is not None,
                        row_patterns, column_patterns, corrections, out_h, out_w,
                        y.reshape(y.shape[0], y.shape[1], -1), *planes_args, rows_per_chunk, blocks_per_split)
        if reader is not None and not float_output:
            return [planes_args[0]]
        if out is not None and y is not out:
            out[...] = y
            y = out
        return [y] if reader is None else [y, planes_args[0]]

    return run


# The kernel's last arguments (planes_out, planes_thresholds, planes_binary, planes_top, planes_left,
# planes_group_channels, write_float) for a node that writes float32 only: no planes.
_NO_PLANES_ARGS = (np.zeros((0, 1, 1, 1, 1), dtype=np.uint64), np.zeros((1, 1), dtype=np.float32), False, 0, 0, 1,
                   True)


class _PlanesReader:
    """What a PAConv with attrs["output_planes"] (engine/fusion.py: hand_off_planes) needs to write
    its reader's bit-planes: the reader's thresholds [N, O] (float32), its activation code
    (output_planes["coding"], default "thermometer"), pads, group and the words of a padded
    position (the bits of the reader's pad value, [P, words])."""

    def __init__(self, node, out_channels):
        spec = node.attrs["output_planes"]
        self.thresholds = np.ascontiguousarray(node.params["output_thresholds"], dtype=np.float32)
        self.pads = [int(p) for p in spec["pads"]]
        self.group_channels = out_channels // spec["group"]
        coding = spec.get("coding", "thermometer")
        self.binary = coding == "binary"
        pad_value = np.float32(spec["pad_value"])
        self.pad_words = pack_activations(np.full((1, out_channels, 1, 1), pad_value, dtype=np.float32),
                                          self.thresholds, (0, 0, 0, 0), pad_value, spec["group"], coding)[:, 0, 0, 0]

    def empty_planes(self, batch, height, width):
        """[P, batch, padded height, padded width, words] uint64: pad words on the border, 0 inside."""
        top, left, bottom, right = self.pads
        planes = np.empty((self.pad_words.shape[0], batch, height + top + bottom, width + left + right,
                           self.pad_words.shape[1]), dtype=np.uint64)
        planes[...] = self.pad_words[:, None, None, None, :]
        planes[:, :, top:top + height, left:left + width] = 0
        return planes


@parallel_jit
def _pa_conv_kernel(planes, activations, weights, m_planes, kh, kw, stride_h, stride_w, dilation_h, dilation_w,
                    origin_top, origin_left, group,
                    slot_channels, out_channels, constant, lowest_weight, pair_scales, steps, residual, has_residual,
                    relu, has_correction, row_patterns, column_patterns, corrections, out_h, out_w, y,
                    planes_out, planes_thresholds, planes_binary, planes_top, planes_left, planes_group_channels,
                    write_float, rows_per_chunk, blocks_per_split):
    """A direct convolution: one work item per (chunk of `rows_per_chunk` output rows of one
    image, range of `blocks_per_split` 16-channel blocks) per parallel iteration.

    The activation planes are read in place (`activations` is `planes` flattened, padded by at
    least the conv's pads; the conv's own padded input starts at row origin_top, column
    origin_left of them, 0 when padded exactly by its pads): each output
    pixel's window starts at bases[pixel] and word t of a window (tap ky, kx, channel word w of
    its group) lies offsets[t] further, so stride, dilation and tiles that cross rows need no
    copy. For each tile of 8 pixels x 16 output slots (one group's block, see `output_slots`) the
    micro-kernel (engine/popcount_block.py: popcount_direct_block) counts over the whole window
    in int64 registers and adds pair_scales[k, j] * counts into `partial` ([slot, pixel],
    transposed in registers) over every (k, j), k outer and j inner: the same order for every
    thread count, and the work split depends on the shapes only. The epilogue adds constant +
    lowest_weight * act_term of the group (+ the border correction of "zero_after_quantizer" when
    `has_correction`, see `edge_corrections`; + residual, ReLU) in float64 and rounds once to
    float32.
    slot_channels: int64 [padded channels], the output channel of each slot (-1 for padding);
    constant, lowest_weight: float64 [padded channels] by slot; pair_scales: float64
    [M * N * padded channels], padding slots zero; weights: `interleave_weight_planes`.
    residual: float32 [batch, O, out_h * out_w] (rows flattened) when `has_residual`.
    The output [batch, O, out_h * out_w] (rows flattened) goes to y as float32, or, when planes_out
    has planes ([P', batch, padded height, padded width, words], prefilled by
    `_PlanesReader.empty_planes`), as the bits of float32(y) >= planes_thresholds[j, o] (or, with
    `planes_binary`, bit j of the
    count of planes_thresholds[:, o] passed) at (oy + planes_top, ox + planes_left), in the layout
    of engine/bits.py with groups of planes_group_channels channels (y unused unless `write_float`:
    then y gets the float32 output as well, the same values the planes compare). Splitting the
    channels over work items (blocks_per_split < all blocks) needs group 1 and, when writing
    planes, planes_group_channels a multiple of 64, so that items write disjoint words."""
    n_planes, batch, padded_height, padded_width, n_words = planes.shape
    plane_size = batch * padded_height * padded_width * n_words
    row_size = padded_width * n_words
    write_planes = planes_out.shape[0] > 0
    out_words = planes_out.shape[4]
    planes_group_words = (planes_group_channels + 63) // 64
    zero = np.uint64(0)
    padded_channels = constant.shape[0]
    group_words = n_words // group
    taps = kh * kw * group_words
    offsets = np.empty(taps, dtype=np.int64)
    for ky in range(kh):
        for kx in range(kw):
            for w in range(group_words):
                offsets[(ky * kw + kx) * group_words + w] = ky * dilation_h * row_size + kx * dilation_w * n_words + w
    blocks = padded_channels // DIRECT_CHANNELS
    group_blocks = blocks // group
    group_out = out_channels // group
    chunks_per_image = -(-out_h // rows_per_chunk)
    splits = -(-blocks // blocks_per_split)
    # position_ones[j, b, g, y, x]: popcount of the words of group g of plane j at padded position
    # (y, x); a window's count is the sum over its kh x kw positions.
    position_ones = np.empty((n_planes, batch, group, padded_height, padded_width), dtype=np.int32)
    for row in prange(n_planes * batch * padded_height):
        j = row // (batch * padded_height)
        b = row // padded_height % batch
        py = row % padded_height
        for g in range(group):
            for px in range(padded_width):
                total = zero  # uint64, as popcount64 returns (an int 0 would unify to float64)
                for w in range(g * group_words, (g + 1) * group_words):
                    total += popcount64(planes[j, b, py, px, w])
                position_ones[j, b, g, py, px] = np.int32(total)
    for item in prange(batch * chunks_per_image * splits):
        split = item % splits
        chunk = item // splits
        b = chunk // chunks_per_image
        first_row = (chunk % chunks_per_image) * rows_per_chunk
        rows = min(rows_per_chunk, out_h - first_row)
        n_pixels = rows * out_w
        n_tiles = -(-n_pixels // DIRECT_PIXELS)
        first_block = split * blocks_per_split
        last_block = min(blocks, first_block + blocks_per_split)
        first_slot = first_block * DIRECT_CHANNELS
        channels = (last_block - first_block) * DIRECT_CHANNELS
        bases = np.empty(n_tiles * DIRECT_PIXELS, dtype=np.int64)
        for r in range(rows):
            row_base = (b * padded_height + (first_row + r) * stride_h + origin_top) * row_size
            for ox in range(out_w):
                bases[r * out_w + ox] = row_base + (origin_left + ox * stride_w) * n_words
        for pixel in range(n_pixels, n_tiles * DIRECT_PIXELS):
            bases[pixel] = bases[n_pixels - 1]  # the last tile's padding: results never used
        # act_terms[g, pixel] = sum_j steps[j] * popcount of the pixel's window in plane j, group g.
        act_terms = np.zeros((group, n_pixels))
        window_ones = np.empty(n_pixels, dtype=np.int64)
        for j in range(n_planes):
            for g in range(group):
                window_ones[:] = 0
                for r in range(rows):
                    counts = window_ones[r * out_w:(r + 1) * out_w]
                    for ky in range(kh):
                        source = position_ones[j, b, g, (first_row + r) * stride_h + ky * dilation_h + origin_top]
                        for kx in range(kw):
                            tap = source[origin_left + kx * dilation_w:]
                            for ox in range(out_w):
                                counts[ox] += tap[ox * stride_w]
                for pixel in range(n_pixels):
                    act_terms[g, pixel] += steps[j] * window_ones[pixel]
        # partial [slot, pixel] holds sum_kj pair_scales * popcounts: the first (k, j) pair
        # stores, the others add. Block outer, pixels inner: one block's weights stay in L1.
        stride = n_tiles * DIRECT_PIXELS
        partial = np.empty(channels * stride)
        for block in range(first_block, last_block):
            shift = (block // group_blocks) * group_words
            for tile in range(n_tiles):
                for k in range(m_planes):
                    weight_start = (k * blocks + block) * taps * DIRECT_CHANNELS
                    for j in range(n_planes):
                        popcount_direct_block(activations, bases, tile * DIRECT_PIXELS, j * plane_size + shift,
                                              offsets, taps, weights, weight_start, pair_scales,
                                              (k * n_planes + j) * padded_channels + block * DIRECT_CHANNELS,
                                              partial, (block - first_block) * DIRECT_CHANNELS * stride
                                              + tile * DIRECT_PIXELS, stride, k + j > 0)
        # Epilogue, one output channel at a time over the chunk's pixels, which are contiguous in
        # y and residual too (whole rows): simple loops over 1-D slices, they vectorize.
        values = np.empty(n_pixels)
        float_scratch = np.empty(n_pixels, dtype=np.float32)  # the float32 stores of a planes-only output
        row_words = np.zeros((planes_out.shape[0], out_words, n_pixels), dtype=np.uint64)
        levels = np.zeros(n_pixels, dtype=np.int64)  # the binary code's count of thresholds passed
        first = first_row * out_w
        for slot in range(first_slot, first_slot + channels):
            o = slot_channels[slot]
            if o < 0:
                continue
            act_term = act_terms[o // group_out]
            start = (slot - first_slot) * stride
            slot_partial = partial[start:start + n_pixels]
            if not has_correction and not (write_planes and planes_binary):
                # The common float32 output, and a thermometer hand-off, in one pass per case (the
                # same operations in the same order as the general path below, so the same bits);
                # a hand-off then sets each plane's bits from the stored values, in loops that
                # vectorize.
                target = y[b, o, first:first + n_pixels] if write_float or not write_planes else float_scratch
                base, weight = constant[slot], lowest_weight[slot]
                if has_residual:
                    shortcut = residual[b, o, first:first + n_pixels]
                    if relu:
                        for q in range(n_pixels):
                            target[q] = max(base + weight * act_term[q] + slot_partial[q] + shortcut[q], 0.0)
                    else:
                        for q in range(n_pixels):
                            target[q] = base + weight * act_term[q] + slot_partial[q] + shortcut[q]
                elif relu:
                    for q in range(n_pixels):
                        target[q] = max(base + weight * act_term[q] + slot_partial[q], 0.0)
                else:
                    for q in range(n_pixels):
                        target[q] = base + weight * act_term[q] + slot_partial[q]
                if write_planes:
                    within = o % planes_group_channels
                    word = (o // planes_group_channels) * planes_group_words + (within >> 6)
                    bit = np.uint64(1) << np.uint64(within & 63)
                    for j in range(planes_out.shape[0]):
                        threshold = planes_thresholds[j, o]
                        words = row_words[j, word]
                        for q in range(n_pixels):
                            words[q] = words[q] | (bit if target[q] >= threshold else zero)
                continue
            for q in range(n_pixels):
                values[q] = constant[slot] + lowest_weight[slot] * act_term[q] + slot_partial[q]
            if has_correction:
                for q in range(n_pixels):
                    values[q] += corrections[row_patterns[first_row + q // out_w], o, column_patterns[q % out_w]]
            if has_residual:
                shortcut = residual[b, o, first:first + n_pixels]
                for q in range(n_pixels):
                    values[q] += shortcut[q]
            if relu:
                for q in range(n_pixels):
                    values[q] = max(values[q], 0.0)
            if write_float:
                target = y[b, o, first:first + n_pixels]
                for q in range(n_pixels):
                    target[q] = values[q]
            if write_planes:
                # As engine/bits.py packs: the float32 value against the threshold, OR-ed into
                # [plane, word, pixel] rows (they vectorize), transposed out after the last channel.
                within = o % planes_group_channels
                word = (o // planes_group_channels) * planes_group_words + (within >> 6)
                bit = np.uint64(1) << np.uint64(within & 63)
                if planes_binary:
                    levels[:] = 0
                    for j in range(planes_thresholds.shape[0]):
                        threshold = planes_thresholds[j, o]
                        for q in range(n_pixels):
                            levels[q] += 1 if np.float32(values[q]) >= threshold else 0
                    for j in range(planes_out.shape[0]):
                        words = row_words[j, word]
                        for q in range(n_pixels):
                            words[q] = words[q] | (bit if (levels[q] >> j) & 1 else zero)
                    continue
                for j in range(planes_out.shape[0]):
                    threshold = planes_thresholds[j, o]
                    words = row_words[j, word]
                    for q in range(n_pixels):
                        words[q] = words[q] | (bit if np.float32(values[q]) >= threshold else zero)
                continue
        if write_planes:
            # Only this item's words: with split channels they are whole 64-channel words.
            first_word, last_word = 0, out_words
            if splits > 1:
                first_word = first_slot // 64
                last_word = min(out_words, -(-min(out_channels, first_slot + channels) // 64))
            for j in range(planes_out.shape[0]):
                for r in range(rows):
                    for ox in range(out_w):
                        for w in range(first_word, last_word):
                            planes_out[j, b, first_row + r + planes_top, planes_left + ox, w] = \
                                row_words[j, w, r * out_w + ox]


def work_split(batch, out_h, out_w, blocks, group, split_channels):
    """(rows_per_chunk, blocks_per_split) of `_pa_conv_kernel`'s work items, from the shapes only
    (never the thread count, so results do not depend on it): chunks of whole output rows with
    about TILE_PIXELS pixels (the 8-pixel tiles run across the rows of a chunk: a 14x14 map takes
    25 tiles where tiles of single rows would take 28), and when that leaves fewer than
    WORK_ITEMS items, the output channels split into ranges of whole 64-channel words (group 1,
    and `split_channels`)."""
    rows_per_chunk = min(out_h, max(1, -(-TILE_PIXELS // out_w)))
    chunks = batch * -(-out_h // rows_per_chunk)
    if group != 1 or not split_channels or chunks >= WORK_ITEMS:
        return rows_per_chunk, blocks
    word_blocks = 64 // DIRECT_CHANNELS  # blocks of one 64-channel word
    per_split = -(-blocks // -(-WORK_ITEMS // chunks))
    return rows_per_chunk, -(-per_split // word_blocks) * word_blocks


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


register(Op("PAConv", "multi-base binary 2-D convolution (M weight x N activation bit-planes)",
            _conv_infer_shapes, _conv_reference, _conv_make_kernel, _conv_cost, output_buffer=True,
            attributes=STORED_ATTRIBUTES + ("group", "strides", "pads", "dilations"), parameters=STORED_PARAMETERS))
register(Op("PALinear", "multi-base binary fully connected layer",
            _linear_infer_shapes, _linear_reference, _linear_make_kernel, _conv_cost,
            attributes=STORED_ATTRIBUTES + ("group",), parameters=STORED_PARAMETERS))
