"""PAConv / PALinear: the numba popcount kernels against the plain-numpy reference."""
import os
import pathlib
import subprocess
import sys

import numba
import numpy as np
import pytest
from tolerances import PA_COMBINE_RTOL, assert_close

from pabnn.engine.bits import pack_weight_planes
from pabnn.engine.errors import GraphError
from pabnn.engine.graph import Node
from pabnn.engine.ops import get_op
from pabnn.engine.ops.pa_conv import act_quantize, weight_values


def random_pa_node(rng, out_channels, in_channels, kernel=(3, 3), weight_bases=2, act_bases=3,
                   strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), op="PAConv",
                   padding_rule="zero_before_quantizer", pad_value=None, group=1):
    """A PAConv (or PALinear) node with random bit-planes and coefficients."""
    signs = rng.random((weight_bases, out_channels, in_channels // group) + tuple(kernel)) < 0.5
    thresholds = np.sort(rng.normal(size=(act_bases, in_channels)), axis=0).astype(np.float32)
    params = {
        "weight_planes": pack_weight_planes(signs),
        "weight_scales": rng.uniform(0.1, 1.0, size=(weight_bases, out_channels)).astype(np.float32),
        "weight_offset": rng.normal(size=out_channels).astype(np.float32),
        "act_thresholds": thresholds,
        "act_steps": rng.uniform(0.1, 1.0, size=act_bases).astype(np.float32),
        "act_lowest": np.array([rng.normal()], np.float32),
        "bias": rng.normal(size=out_channels).astype(np.float32),
    }
    attrs = {"in_channels": in_channels, "padding_rule": padding_rule}
    if pad_value is not None:
        attrs["pad_value"] = pad_value
    if op == "PAConv":
        attrs.update(strides=list(strides), pads=list(pads), dilations=list(dilations))
    if group != 1:
        attrs["group"] = group
    return Node(op, "layer", ["x"], ["y"], attrs, params)


def tap_position(oy, ox, ky, kx, strides, dilations, pads):
    """Input row and column that tap (ky, kx) of output (oy, ox) reads (negative or past the end
    inside the padding)."""
    return oy * strides[0] + ky * dilations[0] - pads[0], ox * strides[1] + kx * dilations[1] - pads[1]


def run_both(node, x):
    op = get_op(node.op)
    (fast,) = op.make_kernel(node)([x])
    (reference,) = op.reference(node, [x.astype(np.float64)])
    return fast, reference


GEOMETRIES = [
    # kernel, strides, pads, dilations
    ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    ((3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    ((5, 5), (1, 1), (2, 2, 2, 2), (1, 1)),
    ((3, 1), (2, 1), (0, 1, 2, 0), (1, 1)),
    ((1, 1), (2, 2), (0, 0, 0, 0), (1, 1)),
]


@pytest.mark.parametrize("in_channels", [1, 3, 64, 65, 130])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"k{g[0]}s{g[1]}p{g[2]}d{g[3]}")
@pytest.mark.parametrize("bases", [(1, 1), (2, 3), (4, 5)], ids=lambda b: f"PA{b}")
def test_pa_conv_kernel_equals_reference(in_channels, geometry, bases):
    kernel, strides, pads, dilations = geometry
    rng = np.random.default_rng(in_channels * 7 + sum(bases))
    node = random_pa_node(rng, 5, in_channels, kernel, *bases, strides, pads, dilations)
    x = rng.normal(size=(2, in_channels, 7, 6)).astype(np.float32)
    fast, reference = run_both(node, x)
    assert fast.dtype == np.float32
    assert_close(fast, reference, PA_COMBINE_RTOL, "PAConv")


@pytest.mark.parametrize("in_channels", [1, 70, 128])
@pytest.mark.parametrize("bases", [(1, 1), (3, 2)])
def test_pa_linear_kernel_equals_reference(in_channels, bases):
    rng = np.random.default_rng(in_channels)
    node = random_pa_node(rng, 9, in_channels, (1, 1), *bases, op="PALinear")
    x = rng.normal(size=(4, in_channels)).astype(np.float32)
    fast, reference = run_both(node, x)
    assert fast.shape == (4, 9)
    assert_close(fast, reference, PA_COMBINE_RTOL, "PALinear")


def test_reference_is_the_pa_formula():
    """The reference equals conv(Qw(W), Qa(pad(x))) written out by hand for one output."""
    rng = np.random.default_rng(3)
    node = random_pa_node(rng, 2, 3, (3, 3), 2, 2, pads=(1, 1, 1, 1))
    x = rng.normal(size=(1, 3, 4, 4))
    (y,) = get_op("PAConv").reference(node, [x])
    weight = weight_values(node)
    p = node.params
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    quantized = act_quantize(padded, p["act_thresholds"], p["act_steps"], p["act_lowest"])
    expected = np.sum(weight[1] * quantized[0, :, 0:3, 1:4]) + p["bias"][1]
    assert y[0, 1, 0, 1] == pytest.approx(expected, rel=1e-12)
    # Qw takes exactly the levels c + sum_k d_k * (+-1).
    levels = {round(float(p["weight_offset"][0] + s0 * p["weight_scales"][0, 0] + s1 * p["weight_scales"][1, 0]), 5)
              for s0 in (-1, 1) for s1 in (-1, 1)}
    assert {round(float(v), 5) for v in weight[0].ravel()} <= levels


@pytest.mark.parametrize("strides,dilations,pads", [((1, 1), (1, 1), (1, 1, 1, 1)),
                                                    ((2, 2), (2, 2), (2, 1, 0, 2))])
def test_one_hot_input_shows_which_taps_fire(strides, dilations, pads):
    """Output channel o holds weight level 2 only at tap o (levels {0, 2}: offset 1, scale 1);
    with a single 1 in the input, output o at (oy, ox) is 2 exactly when tap o of that window
    sits on the 1."""
    kh, kw = 3, 3
    signs = np.zeros((1, kh * kw, 1, kh, kw), dtype=bool)
    for o in range(kh * kw):
        signs[0, o, 0, o // kw, o % kw] = True
    node = Node("PAConv", "taps", ["x"], ["y"], {
        "in_channels": 1, "strides": list(strides), "pads": list(pads), "dilations": list(dilations),
    }, {
        "weight_planes": pack_weight_planes(signs),
        "weight_scales": np.ones((1, kh * kw), np.float32),
        "weight_offset": np.ones(kh * kw, np.float32),
        "act_thresholds": np.array([[0.5]], np.float32),
        "act_steps": np.array([1.0], np.float32),
        "act_lowest": np.array([0.0], np.float32),
        "bias": np.zeros(kh * kw, np.float32),
    })
    height, width = 7, 6
    for hot_y, hot_x in [(0, 0), (3, 2), (6, 5)]:
        x = np.zeros((1, 1, height, width), np.float32)
        x[0, 0, hot_y, hot_x] = 1.0
        (y,) = get_op("PAConv").make_kernel(node)([x])
        expected = np.zeros_like(y)
        for o in range(kh * kw):
            ky, kx = divmod(o, kw)
            for oy in range(y.shape[2]):
                for ox in range(y.shape[3]):
                    iy, ix = tap_position(oy, ox, ky, kx, strides, dilations, pads)
                    expected[0, o, oy, ox] = 2.0 if (iy, ix) == (hot_y, hot_x) else 0.0
        np.testing.assert_array_equal(y, expected)


def test_nan_and_threshold_ties_match_the_reference():
    rng = np.random.default_rng(5)
    node = random_pa_node(rng, 4, 3, (3, 3), 2, 3)
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    x[0, 1, 2, 2] = np.nan
    x[1, 0, 1, 3] = node.params["act_thresholds"][1, 0]  # exactly on a threshold
    fast, reference = run_both(node, x)
    assert np.all(np.isfinite(fast))  # NaN becomes the lowest activation level
    assert_close(fast, reference, PA_COMBINE_RTOL, "PAConv with NaN and ties")


@pytest.mark.parametrize("out_channels", [200, 64])
@pytest.mark.parametrize("geometry", GEOMETRIES[1:3], ids=lambda g: f"k{g[0]}s{g[1]}p{g[2]}d{g[3]}")
def test_outputs_split_over_channel_ranges_equal_reference(out_channels, geometry):
    # A small map (few row chunks) splits the output channels over work items in whole
    # 64-channel words (engine/ops/_binary_conv_kernel.py: work_split); 200 ends in a partial block.
    kernel, strides, pads, dilations = geometry
    rng = np.random.default_rng(out_channels)
    node = random_pa_node(rng, out_channels, 65, kernel, 2, 3, strides, pads, dilations)
    x = rng.normal(size=(1, 65, 5, 6)).astype(np.float32)
    fast, reference = run_both(node, x)
    assert_close(fast, reference, PA_COMBINE_RTOL, "PAConv split over channels")


@pytest.mark.parametrize("rule,pad_value", [("zero_before_quantizer", None), ("zero_after_quantizer", None)])
@pytest.mark.parametrize("threads,width", [(2, 6), (1, 64)])
def test_tall_maps_split_into_row_chunks_equal_reference(rule, pad_value, threads, width):
    # 70 rows: two chunks of whole rows per image (engine/ops/_binary_conv_kernel.py: work_split; rows of 6
    # pixels by TILE_PIXELS at 2 threads, rows of 64 by SINGLE_THREAD_PIXELS at 1), the second starting at
    # row 35; the border correction follows the row.
    if numba.config.NUMBA_NUM_THREADS < threads:
        pytest.skip(f"needs {threads} numba threads")
    rng = np.random.default_rng(2)
    node = random_pa_node(rng, 40, 65, (3, 3), 2, 3, padding_rule=rule, pad_value=pad_value)
    x = rng.normal(size=(2, 65, 70, width)).astype(np.float32)
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(threads)
        fast, reference = run_both(node, x)
    finally:
        numba.set_num_threads(previous)
    assert_close(fast, reference, PA_COMBINE_RTOL, "PAConv in row chunks")


@pytest.mark.parametrize("group", [1, 2, 70])
def test_results_do_not_depend_on_the_thread_count(group):
    rng = np.random.default_rng(11)
    node = random_pa_node(rng, {1: 200, 2: 16, 70: 70}[group], 70, (3, 3), 2, 2, group=group)
    x = rng.normal(size=(3, 70, 9, 9)).astype(np.float32)
    kernel = get_op("PAConv").make_kernel(node)
    previous = numba.get_num_threads()
    try:
        outputs = []
        for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(threads)
            outputs.append(kernel([x])[0])
    finally:
        numba.set_num_threads(previous)
    for output in outputs[1:]:
        np.testing.assert_array_equal(output, outputs[0])


# ---- padding rules ------------------------------------------------------------------------------

# (padding_rule, pad_value): a pad value between thresholds, one exactly on a threshold (ties go
# up), and zero padding after the quantizer (Qa(0) is not 0 for these random staircases).
PADDING_CASES = [("value_before_quantizer", -1.0), ("value_before_quantizer", "threshold"),
                 ("zero_after_quantizer", None)]


@pytest.mark.parametrize("in_channels", [1, 3, 65])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"k{g[0]}s{g[1]}p{g[2]}d{g[3]}")
@pytest.mark.parametrize("bases", [(1, 1), (2, 3)], ids=lambda b: f"PA{b}")
@pytest.mark.parametrize("rule,pad_value", PADDING_CASES, ids=lambda v: str(v))
def test_pa_conv_padding_rules_kernel_equals_reference(in_channels, geometry, bases, rule, pad_value):
    kernel, strides, pads, dilations = geometry
    rng = np.random.default_rng(in_channels * 5 + sum(bases))
    node = random_pa_node(rng, 5, in_channels, kernel, *bases, strides, pads, dilations, padding_rule=rule)
    if pad_value == "threshold":
        node.attrs["pad_value"] = float(node.params["act_thresholds"][0, 0])
    elif pad_value is not None:
        node.attrs["pad_value"] = pad_value
    x = rng.normal(size=(2, in_channels, 7, 6)).astype(np.float32)
    fast, reference = run_both(node, x)
    assert fast.dtype == np.float32
    assert_close(fast, reference, PA_COMBINE_RTOL, f"PAConv {rule}")


def test_zero_after_quantizer_with_residual_and_relu_equals_reference():
    """The border correction is added before the fused residual and ReLU."""
    rng = np.random.default_rng(8)
    node = random_pa_node(rng, 6, 10, (3, 3), 1, 1, (1, 1), (1, 2, 1, 0), padding_rule="zero_after_quantizer")
    node.attrs["activation"] = "relu"
    node.inputs.append("shortcut")
    x = rng.normal(size=(2, 10, 5, 6)).astype(np.float32)
    shortcut = rng.normal(size=(2, 6, 5, 6)).astype(np.float32)
    op = get_op("PAConv")
    (fast,) = op.make_kernel(node)([x, shortcut])
    (reference,) = op.reference(node, [x.astype(np.float64), shortcut.astype(np.float64)])
    assert_close(fast, reference, PA_COMBINE_RTOL, "PAConv zero_after_quantizer + residual + relu")


@pytest.mark.parametrize("rule,pad_value,pad_level", [("zero_before_quantizer", None, 1.0),
                                                      ("value_before_quantizer", 3.0, 1.0),
                                                      ("value_before_quantizer", -3.0, -1.0),
                                                      ("zero_after_quantizer", None, 0.0)])
@pytest.mark.parametrize("strides,dilations,pads", [((1, 1), (1, 1), (1, 1, 1, 1)),
                                                    ((2, 2), (2, 2), (2, 1, 0, 2)),
                                                    ((1, 2), (1, 1), (0, 3, 2, 1))])
def test_one_hot_weights_show_what_each_padded_tap_holds(rule, pad_value, pad_level, strides, dilations, pads):
    """Output channel o has weight level 2 at tap o and 0 elsewhere; the input is binary {-1, +1}
    (threshold 0) and all -1. So output o at (oy, ox) is 2 * (-1) when tap o reads the input and
    2 * (what a padded position holds) when it reads padding: Qa(0) = +1 for zero padding before
    the quantizer, Qa(pad_value) for an explicit pad value, exactly 0 for zero padding after it."""
    kh, kw = 3, 3
    signs = np.zeros((1, kh * kw, 1, kh, kw), dtype=bool)
    for o in range(kh * kw):
        signs[0, o, 0, o // kw, o % kw] = True
    attrs = {"in_channels": 1, "strides": list(strides), "pads": list(pads), "dilations": list(dilations),
             "padding_rule": rule}
    if pad_value is not None:
        attrs["pad_value"] = pad_value
    node = Node("PAConv", "taps", ["x"], ["y"], attrs, {
        "weight_planes": pack_weight_planes(signs),
        "weight_scales": np.ones((1, kh * kw), np.float32),
        "weight_offset": np.ones(kh * kw, np.float32),
        "act_thresholds": np.array([[0.0]], np.float32),
        "act_steps": np.array([2.0], np.float32),
        "act_lowest": np.array([-1.0], np.float32),
        "bias": np.zeros(kh * kw, np.float32),
    })
    height, width = 7, 6
    x = np.full((2, 1, height, width), -5.0, np.float32)
    fast, reference = run_both(node, x)
    expected = np.zeros_like(fast)
    for o in range(kh * kw):
        ky, kx = divmod(o, kw)
        for oy in range(fast.shape[2]):
            for ox in range(fast.shape[3]):
                iy, ix = tap_position(oy, ox, ky, kx, strides, dilations, pads)
                inside = 0 <= iy < height and 0 <= ix < width
                expected[:, o, oy, ox] = 2.0 * (-1.0 if inside else pad_level)
    np.testing.assert_array_equal(fast, expected)
    np.testing.assert_array_equal(reference, expected)


def test_zero_after_quantizer_counts_only_the_taps_inside():
    """All weights +1, binary input all +1: each output is the number of its taps inside the
    input (9 inside, 6 on an edge, 4 in a corner) with zero padding after the quantizer, while
    zero padding before it (Qa(0) = +1) gives 9 everywhere."""
    node = random_pa_node(np.random.default_rng(0), 1, 1, (3, 3), 1, 1, padding_rule="zero_after_quantizer")
    node.params.update(weight_planes=pack_weight_planes(np.ones((1, 1, 1, 3, 3), bool)),
                       weight_scales=np.ones((1, 1), np.float32), weight_offset=np.zeros(1, np.float32),
                       act_thresholds=np.zeros((1, 1), np.float32), act_steps=np.array([2.0], np.float32),
                       act_lowest=np.array([-1.0], np.float32), bias=np.zeros(1, np.float32))
    x = np.ones((1, 1, 4, 5), np.float32)
    fast, _ = run_both(node, x)
    expected = np.array([[4, 6, 6, 6, 4], [6, 9, 9, 9, 6], [6, 9, 9, 9, 6], [4, 6, 6, 6, 4]], np.float32)
    np.testing.assert_array_equal(fast[0, 0], expected)
    node.attrs["padding_rule"] = "zero_before_quantizer"
    np.testing.assert_array_equal(run_both(node, x)[0][0, 0], np.full((4, 5), 9.0, np.float32))


@pytest.mark.parametrize("attrs,message", [
    ({"padding_rule": "value_before_quantizer"}, "pad_value"),
    ({"padding_rule": "value_before_quantizer", "pad_value": "1"}, "pad_value"),
    ({"padding_rule": "value_before_quantizer", "pad_value": 1e39}, "pad_value"),
    ({"padding_rule": "zero_after_quantizer", "pad_value": 1.0}, "only used by"),
    ({"padding_rule": "sign_then_zero"}, "not supported"),
])
def test_bad_padding_attributes_are_refused(attrs, message):
    node = random_pa_node(np.random.default_rng(1), 2, 3)
    node.attrs.update(attrs)
    with pytest.raises(GraphError, match=message):
        get_op("PAConv").infer_shapes(node, [(None, 3, 5, 5)])


# ---- groups -------------------------------------------------------------------------------------

# (in_channels, out_channels, group): groups of 2, 3, 4; channels per group above 64 and not a
# multiple of it (130 / 2 = 65); more than 16 output channels per group (two or three 16-channel blocks);
# depthwise (group = in_channels), with and without a channel multiplier.
GROUPINGS = [(6, 6, 2), (12, 9, 3), (8, 12, 4), (130, 10, 2), (6, 40, 2), (6, 80, 2), (5, 5, 5), (70, 70, 70),
             (4, 8, 4)]


@pytest.mark.parametrize("channels", GROUPINGS, ids=lambda c: f"C{c[0]}O{c[1]}g{c[2]}")
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"k{g[0]}s{g[1]}p{g[2]}d{g[3]}")
@pytest.mark.parametrize("bases", [(1, 1), (2, 3)], ids=lambda b: f"PA{b}")
def test_grouped_pa_conv_kernel_equals_reference(channels, geometry, bases):
    in_channels, out_channels, group = channels
    kernel, strides, pads, dilations = geometry
    rng = np.random.default_rng(in_channels * 3 + out_channels + group + sum(bases))
    node = random_pa_node(rng, out_channels, in_channels, kernel, *bases, strides, pads, dilations, group=group)
    x = rng.normal(size=(2, in_channels, 7, 6)).astype(np.float32)
    fast, reference = run_both(node, x)
    assert fast.dtype == np.float32 and fast.shape[1] == out_channels
    assert_close(fast, reference, PA_COMBINE_RTOL, f"PAConv group {group}")


@pytest.mark.parametrize("channels", [(6, 6, 3), (130, 4, 2), (5, 5, 5)], ids=lambda c: f"C{c[0]}O{c[1]}g{c[2]}")
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"k{g[0]}s{g[1]}p{g[2]}d{g[3]}")
@pytest.mark.parametrize("bases", [(1, 1), (2, 3)], ids=lambda b: f"PA{b}")
@pytest.mark.parametrize("rule,pad_value", PADDING_CASES, ids=lambda v: str(v))
def test_grouped_pa_conv_padding_rules_kernel_equals_reference(channels, geometry, bases, rule, pad_value):
    in_channels, out_channels, group = channels
    kernel, strides, pads, dilations = geometry
    rng = np.random.default_rng(in_channels * 5 + group + sum(bases))
    node = random_pa_node(rng, out_channels, in_channels, kernel, *bases, strides, pads, dilations,
                          padding_rule=rule, group=group)
    if pad_value == "threshold":
        node.attrs["pad_value"] = float(node.params["act_thresholds"][0, 0])
    elif pad_value is not None:
        node.attrs["pad_value"] = pad_value
    x = rng.normal(size=(2, in_channels, 7, 6)).astype(np.float32)
    fast, reference = run_both(node, x)
    assert_close(fast, reference, PA_COMBINE_RTOL, f"PAConv group {group} {rule}")


@pytest.mark.parametrize("channels", [(6, 6, 2), (8, 12, 4), (5, 5, 5)], ids=lambda c: f"C{c[0]}O{c[1]}g{c[2]}")
def test_grouped_reference_equals_float_conv_with_the_quantized_weights(channels):
    """With zero padding after the quantizer, PAConv (reference and kernel) is a float Conv of the
    same group with weights Qw(W) applied to Qa(x)."""
    in_channels, out_channels, group = channels
    rng = np.random.default_rng(2)
    node = random_pa_node(rng, out_channels, in_channels, (3, 3), 2, 2, (2, 1), (1, 0, 2, 1), (1, 2),
                          padding_rule="zero_after_quantizer", group=group)
    x = rng.normal(size=(2, in_channels, 6, 7))
    p = node.params
    conv = Node("Conv", "float", ["x"], ["y"], {key: node.attrs[key] for key in ("strides", "pads", "dilations")}
                | {"group": group}, {"weight": weight_values(node).astype(np.float32), "bias": p["bias"]})
    (expected,) = get_op("Conv").reference(conv, [act_quantize(x, p["act_thresholds"], p["act_steps"],
                                                                p["act_lowest"])])
    (y,) = get_op("PAConv").reference(node, [x])
    (fast,) = get_op("PAConv").make_kernel(node)([x.astype(np.float32)])
    # The float Conv holds Qw(W) rounded to float32: a difference of about 1e-8 of the scale.
    assert_close(y, expected, PA_COMBINE_RTOL, "PAConv reference vs grouped Conv")
    assert_close(fast, expected, PA_COMBINE_RTOL, "PAConv kernel vs grouped Conv")


@pytest.mark.parametrize("in_channels,group", [(12, 3), (6, 6), (130, 2)])
def test_one_hot_channel_shows_that_an_output_sees_only_its_group(in_channels, group):
    """Weight of output o on channel c of its group is 2^(c mod 4): M = 4 planes, plane k has scale
    2^k / 2 and its bit set only where c mod 4 == k, and the offset is the sum of the scales, so
    Qw = sum_k 2^k [bit k]. The input is 1 in one channel and 0 elsewhere (Qa: 0 or 1). Output o
    is then 2^(c mod 4) when the hot channel c belongs to o's group, and exactly 0 otherwise."""
    out_channels = 2 * group
    group_in, group_out = in_channels // group, out_channels // group
    m_planes = 4
    signs = np.zeros((m_planes, out_channels, group_in, 1, 1), dtype=bool)
    for k in range(m_planes):
        signs[k, :, k::m_planes] = True
    scales = np.repeat((2.0 ** np.arange(m_planes) / 2)[:, None], out_channels, axis=1).astype(np.float32)
    node = Node("PAConv", "groups", ["x"], ["y"], {
        "in_channels": in_channels, "group": group, "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1],
    }, {
        "weight_planes": pack_weight_planes(signs),
        "weight_scales": scales,
        "weight_offset": scales.sum(axis=0),
        "act_thresholds": np.full((1, in_channels), 0.5, np.float32),
        "act_steps": np.array([1.0], np.float32),
        "act_lowest": np.array([0.0], np.float32),
        "bias": np.zeros(out_channels, np.float32),
    })
    kernel = get_op("PAConv").make_kernel(node)
    for hot in sorted({0, group_in - 1, group_in, in_channels // 2, in_channels - 1}):
        x = np.zeros((1, in_channels, 2, 5), np.float32)
        x[0, hot] = 1.0
        (y,) = kernel([x])
        expected = np.zeros(out_channels, np.float32)
        hot_group = hot // group_in
        expected[hot_group * group_out:(hot_group + 1) * group_out] = 2.0 ** ((hot % group_in) % m_planes)
        np.testing.assert_array_equal(y, np.broadcast_to(expected[None, :, None, None], y.shape))
        np.testing.assert_array_equal(get_op("PAConv").reference(node, [x.astype(np.float64)])[0], y)


@pytest.mark.parametrize("change,message", [
    ({"group": 4}, "group must be a positive int dividing"),  # 6 input channels
    ({"group": 0}, "group must be a positive int dividing"),
    ({"group": 2.0}, "group must be a positive int dividing"),
    ({"group": 3}, "group must be a positive int dividing"),  # 4 output channels
])
def test_bad_group_is_refused(change, message):
    node = random_pa_node(np.random.default_rng(1), 4, 6, group=2)
    node.attrs.update(change)
    with pytest.raises(GraphError, match=message):
        get_op("PAConv").infer_shapes(node, [(None, 6, 5, 5)])


def test_grouped_weight_planes_are_validated():
    rng = np.random.default_rng(3)
    # 130 channels in 2 groups: 65 channels per group, 2 words per output channel, not 3.
    node = random_pa_node(rng, 4, 130, group=2)
    assert node.params["weight_planes"].shape[-1] == 2
    wide = random_pa_node(rng, 4, 130)
    node.params["weight_planes"] = wide.params["weight_planes"]
    with pytest.raises(GraphError, match=r"'layer'.*weight_planes.*group 2"):
        get_op("PAConv").infer_shapes(node, [(None, 130, 5, 5)])
    # A bit past a group's 65th channel in its last word.
    node = random_pa_node(rng, 4, 130, group=2)
    node.params["weight_planes"][0, 1, 0, 0, 1] |= np.uint64(1 << 1)
    with pytest.raises(GraphError, match=r"'layer'.*past the 65 channels of its group"):
        get_op("PAConv").infer_shapes(node, [(None, 130, 5, 5)])
    linear = random_pa_node(rng, 4, 6, (1, 1), op="PALinear", group=2)
    with pytest.raises(GraphError, match="group must be 1"):
        get_op("PALinear").infer_shapes(linear, [(None, 6)])


# ---- without AVX-512 ----------------------------------------------------------------------------

_GENERIC_CPU_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_pa_conv import random_pa_node
from pabnn.engine.ops import get_op
rng = np.random.default_rng(5)
node = random_pa_node(rng, 40, 70, (3, 3), 2, 3, (2, 1), (1, 1, 1, 1))
x = rng.normal(size=(2, 70, 7, 9)).astype(np.float32)
np.save(sys.argv[1], get_op("PAConv").make_kernel(node)([x])[0])
"""


def test_generic_cpu_gives_the_same_bits(tmp_path):
    """The micro-kernel's IR legalized for a CPU without AVX-512 (NUMBA_CPU_NAME=generic: no
    VPOPCNTQ, no 512-bit vectors) gives the same float32 output as on this machine."""
    tests = str(pathlib.Path(__file__).parent)
    environment = dict(os.environ, NUMBA_CPU_NAME="generic", PABNN_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", _GENERIC_CPU_SCRIPT, str(tmp_path / "generic.npy"), tests],
                   env=environment, check=True, timeout=300)
    rng = np.random.default_rng(5)
    node = random_pa_node(rng, 40, 70, (3, 3), 2, 3, (2, 1), (1, 1, 1, 1))
    x = rng.normal(size=(2, 70, 7, 9)).astype(np.float32)
    (here,) = get_op("PAConv").make_kernel(node)([x])
    np.testing.assert_array_equal(np.load(tmp_path / "generic.npy"), here)
