"""IntConv / IntLinear: the direct and DFNT kernels against the int64 reference, bit for bit."""
import os
import pathlib
import subprocess
import sys

import numba
import numpy as np
import pytest

from pabnn.engine.errors import GraphError
from pabnn.engine.graph import Graph, Node, TensorInfo
from pabnn.engine.ops import get_op
from pabnn.engine.ops import int_conv, int_conv_dfnt, int_conv_direct
from pabnn.engine.pab_format import load_graph, save
from pabnn.engine.report import format_report, model_report


def int_node(weight, *, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1, zero_point=0,
             input_scale=0.05, weight_scale=None, bias=None, activation=None, op="IntConv", rng=None):
    rng = rng or np.random.default_rng(0)
    out_channels = weight.shape[0]
    attrs = {"input_zero_point": zero_point}
    if op == "IntConv":
        attrs.update(strides=list(strides), pads=list(pads), dilations=list(dilations))
    if group != 1:
        attrs["group"] = group
    if activation:
        attrs["activation"] = activation
    params = {
        "weight": np.ascontiguousarray(weight, dtype=np.int8),
        "weight_scale": (rng.uniform(0.01, 0.1, out_channels) if weight_scale is None else weight_scale).astype(
            np.float32),
        "input_scale": np.array([input_scale], np.float32),
        "bias": (rng.normal(size=out_channels) if bias is None else bias).astype(np.float32),
    }
    return Node(op, "layer", ["x"], ["y"], attrs, params)


def reference_float32(node, inputs):
    (y,) = get_op(node.op).reference(node, inputs)
    return y.astype(np.float32)


# out channels, in channels, kernel, strides, pads, dilations, group, input height x width
GRID = [
    (5, 3, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (11, 9)),
    (10, 3, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1, (17, 15)),
    (9, 13, (3, 3), (2, 2), (0, 1, 2, 0), (1, 1), 1, (10, 12)),
    (7, 10, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 1, (9, 14)),
    (6, 4, (5, 5), (2, 1), (2, 0, 1, 2), (1, 1), 2, (13, 11)),
    (4, 6, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1, (10, 10)),
    (8, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8, (9, 9)),  # depthwise
    (12, 66, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, (6, 7)),
    (3, 5, (3, 1), (1, 2), (1, 0, 1, 0), (1, 1), 1, (40, 7)),  # more tiles than one DFNT block
    (6, 5, (3, 3), (2, 2), (1, 2, 1, 0), (2, 2), 1, (13, 12)),  # row quads one phase row apart
    (5, 7, (5, 3), (2, 3), (2, 1, 2, 1), (3, 2), 1, (17, 16)),  # row quads three phase rows apart
    (9, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (4, 53)),  # rows of 53: two calls, a partial vector
    (17, 3, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1, (6, 230)),  # the stem's rows of 115: three calls
]
# The kernels and, for the direct one, its two quad layouts (int_conv_direct.plan_steps).
KERNEL_VARIANTS = [("direct", "rows"), ("direct", "channels"), ("dfnt", None)]


@pytest.mark.parametrize("kernel, quads", KERNEL_VARIANTS)
@pytest.mark.parametrize("shape", GRID, ids=lambda s: f"{s[0]}x{s[1]}k{s[2][0]}{s[2][1]}s{s[3][0]}{s[3][1]}"
                                                      f"d{s[5][0]}{s[5][1]}g{s[6]}w{s[7][1]}")
def test_kernels_equal_the_int64_reference(shape, kernel, quads):
    out_channels, in_channels, kernel_hw, strides, pads, dilations, group, size = shape
    rng = np.random.default_rng(sum(size) + out_channels)
    weight = rng.integers(-128, 128, (out_channels, in_channels // group) + kernel_hw)
    node = int_node(weight, strides=strides, pads=pads, dilations=dilations, group=group, zero_point=37, rng=rng,
                    activation="relu" if group > 1 else None)
    x = (rng.normal(size=(2, in_channels) + size) * 4).astype(np.float32)
    (fast,) = int_conv.make_conv_kernel(node, kernel, quads)([x])
    assert np.array_equal(fast, reference_float32(node, [x]))


@pytest.mark.parametrize("shape", GRID[:6], ids=lambda s: f"{s[0]}x{s[1]}k{s[2][0]}{s[2][1]}s{s[3][0]}{s[3][1]}")
def test_dfnt_accumulation_is_the_exact_integer_sum(shape):
    """The DFNT's int64 sums themselves (before any float rescale) equal the int64 reference."""
    out_channels, in_channels, kernel_hw, strides, pads, dilations, group, size = shape
    rng = np.random.default_rng(1)
    weight = rng.integers(-128, 128, (out_channels, in_channels // group) + kernel_hw)
    node = int_node(weight, strides=strides, pads=pads, dilations=dilations, group=group, zero_point=200)
    q = rng.integers(0, 256, (2, in_channels) + size)
    expected = int_conv.integer_accumulation(node, q)
    top, left, bottom, right = pads
    centered = np.pad(q - 200, ((0, 0), (0, 0), (top, bottom), (left, right)))
    prepared = int_conv_dfnt.prepare_weights(weight.astype(np.int8), group, strides, dilations)
    sums = int_conv_dfnt.convolve(centered, prepared, expected.shape[2:])  # channels last
    assert np.array_equal(sums.transpose(0, 3, 1, 2), expected)


@pytest.mark.parametrize("kernel, quads", KERNEL_VARIANTS)
@pytest.mark.parametrize("case", ["255 x -128", "0 with zero point 255 x -128", "alternating x 127"])
def test_worst_case_sums_near_the_bound_are_exact(kernel, quads, case):
    """|acc| close to 255 * 128 * MAX_TAPS < 2^31: the int32 accumulator and the modulus 2^32 + 1
    both hold it. 1342 channels x 7x7 = 65758 taps (MAX_TAPS is 65793)."""
    channels, size = 1342, 9
    taps = channels * 49
    assert taps <= int_conv.MAX_TAPS
    if case == "alternating x 127":
        weight = np.full((3, channels, 7, 7), 127)
        weight[1] = -128
        q = np.full((1, channels, size, size), 255)
        zero_point = 0
    else:
        weight = np.full((3, channels, 7, 7), -128)
        zero_point = 0 if case == "255 x -128" else 255
        q = np.full((1, channels, size, size), 255 if zero_point == 0 else 0)
    node = int_node(weight, pads=(1, 1, 1, 1), zero_point=zero_point, input_scale=1.0,
                    weight_scale=np.ones(3), bias=np.zeros(3))
    expected = int_conv.integer_accumulation(node, q)
    assert np.max(np.abs(expected)) == 255 * 128 * taps > 0.99 * 2 ** 31
    (fast,) = int_conv.make_conv_kernel(node, kernel, quads)([(q - zero_point).astype(np.float32)])
    assert np.array_equal(fast, expected.astype(np.float32))


def test_the_quantizer_rounds_half_to_even_and_clips():
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0, 0.49999997]], np.float32).reshape(1, 1, 1, 8)
    assert int_conv.quantize_input(x, 1.0, 10).ravel().tolist() == [10, 12, 12, 10, 8, 255, 0, 10]
    node = int_node(np.ones((1, 1, 1, 1)), zero_point=10, input_scale=1.0, weight_scale=np.ones(1),
                    bias=np.zeros(1))
    for kernel in int_conv.KERNELS:
        (y,) = int_conv.make_conv_kernel(node, kernel)([x])
        assert y.ravel().tolist() == [0, 2, 2, 0, -2, 245, -10, 0]


def test_padding_holds_the_zero_point_so_real_zero():
    """A constant input equal to the padding's real value 0 gives the same sum at the border as
    inside: nothing is added by padded taps."""
    node = int_node(np.ones((1, 1, 3, 3)), pads=(1, 1, 1, 1), zero_point=128, input_scale=1.0,
                    weight_scale=np.ones(1), bias=np.zeros(1))
    for kernel in int_conv.KERNELS:
        (y,) = int_conv.make_conv_kernel(node, kernel)([np.zeros((1, 1, 4, 4), np.float32)])
        assert not np.any(y)
        (y,) = int_conv.make_conv_kernel(node, kernel)([np.ones((1, 1, 4, 4), np.float32)])
        assert y[0, 0].tolist() == [[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]]


@pytest.mark.parametrize("kernel", int_conv.KERNELS)
def test_results_do_not_depend_on_the_thread_count(kernel):
    rng = np.random.default_rng(3)
    node = int_node(rng.integers(-128, 128, (16, 5, 5, 5)), strides=(2, 2), pads=(2, 2, 2, 2), zero_point=3)
    x = rng.normal(size=(2, 5, 33, 29)).astype(np.float32)
    run = int_conv.make_conv_kernel(node, kernel)
    previous = numba.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2):
            numba.set_num_threads(threads)
            outputs.append(run([x])[0])
    finally:
        numba.set_num_threads(previous)
    assert np.array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("width", [6, 37])
def test_residual_and_relu_epilogue(width):
    rng = np.random.default_rng(4)
    node = int_node(rng.integers(-128, 128, (11, 3, 3, 3)), pads=(1, 1, 1, 1), activation="relu", zero_point=9)
    node.inputs.append("shortcut")
    x = rng.normal(size=(2, 3, 6, width)).astype(np.float32)
    residual = rng.normal(size=(2, 11, 6, width)).astype(np.float32)
    expected = reference_float32(node, [x, residual])
    assert np.min(expected) == 0 and np.any(expected > 0)
    for kernel, quads in KERNEL_VARIANTS:
        (y,) = int_conv.make_conv_kernel(node, kernel, quads)([x, residual])
        assert np.array_equal(y, expected)


@pytest.mark.parametrize("kernel", int_conv.KERNELS)
def test_a_strided_output_buffer_gets_the_same_values(kernel):
    rng = np.random.default_rng(9)
    node = int_node(rng.integers(-128, 128, (6, 3, 3, 3)), pads=(1, 1, 1, 1), zero_point=4)
    x = rng.normal(size=(2, 3, 5, 19)).astype(np.float32)
    out = np.full((2, 6, 5, 38), np.nan, np.float32)[..., ::2]
    (y,) = int_conv.make_conv_kernel(node, kernel)([x], out=out)
    assert y is out and np.array_equal(out, reference_float32(node, [x]))


def test_int_linear_equals_its_reference():
    rng = np.random.default_rng(5)
    node = int_node(rng.integers(-128, 128, (7, 19, 1, 1)), zero_point=100, op="IntLinear")
    x = rng.normal(size=(5, 19)).astype(np.float32)
    op = get_op("IntLinear")
    assert op.infer_shapes(node, [(None, 19)]) == [(None, 7)]
    (y,) = op.make_kernel(node)([x])
    assert np.array_equal(y, reference_float32(node, [x]))


@pytest.mark.parametrize("change, message", [
    (lambda n: n.params.update(weight=n.params["weight"].astype(np.float32)), "int8"),
    (lambda n: n.attrs.update(input_zero_point=256), "input_zero_point"),
    (lambda n: n.params.update(input_scale=np.array([0.0], np.float32)), "positive"),
    (lambda n: n.params.update(weight=np.zeros((2, 1400, 7, 7), np.int8)), "taps"),
])
def test_invalid_nodes_are_refused_naming_the_problem(change, message):
    node = int_node(np.ones((2, 3, 3, 3)))
    change(node)
    with pytest.raises(GraphError, match=message):
        get_op("IntConv").infer_shapes(node, [(None, node.params["weight"].shape[1], 8, 8)])


def test_pab_round_trip_and_report(tmp_path):
    rng = np.random.default_rng(6)
    node = int_node(rng.integers(-128, 128, (8, 3, 7, 7)), strides=(2, 2), pads=(3, 3, 3, 3), zero_point=0)
    graph = Graph([TensorInfo("x", (None, 3, 20, 20))], ["y"], [node])
    path = tmp_path / "int.pab"
    save(graph, path)
    loaded = load_graph(path)
    assert loaded.nodes[0].params["weight"].dtype == np.int8
    for key, value in node.params.items():
        assert np.array_equal(loaded.nodes[0].params[key], value)
    assert loaded.nodes[0].attrs == node.attrs
    (row,) = model_report(loaded)["layers"]
    macs = 8 * 10 * 10 * 3 * 49
    assert row["kind"] == "int8"
    assert row["stored_bytes"] == 8 * 3 * 49 + 4 * 8 + 4 + 4 * 8  # int8 weights, scales, input scale, bias
    assert row["int_macs"] == macs and row["bops"] == 0
    totals = model_report(loaded)["totals"]
    assert totals["ops"] == totals["flops"] + 2 * macs and totals["integer_layers"] == 1
    assert "int8" in format_report(model_report(loaded)) and "2 * int MACs" in format_report(model_report(loaded))


def test_dfnt_products_in_int64_when_a_residue_does_not_fit_int32():
    """The int64 product path (taken when a centered residue is +2^31) gives the same sums as the
    int32 one, and the convolution through it equals the reference."""
    rng = np.random.default_rng(7)
    transformed = rng.integers(-2 ** 31, 2 ** 31, (16, 2, 3, 5))
    centered = rng.integers(-2 ** 31, 2 ** 31, (16, 6, 4))
    centered[3, 1, 2] = 2 ** 31
    wide = np.zeros((16, 2, 4, 5), np.int64)
    int_conv_dfnt._pointwise(transformed, centered, wide)
    expected = np.einsum("fgco,fgct->fgto", transformed.astype(object),
                         centered.reshape(16, 2, 3, 4).astype(object)) % int_conv_dfnt.MODULUS
    assert np.array_equal(wide.astype(object) % int_conv_dfnt.MODULUS, expected)
    centered[3, 1, 2] = 2 ** 31 - 1
    narrow = np.zeros_like(wide)
    int_conv_dfnt._pointwise(transformed.astype(np.int32), centered.astype(np.int32), narrow)
    wide[:] = 0
    int_conv_dfnt._pointwise(transformed, centered, wide)
    assert np.array_equal(narrow, wide)
    weight = rng.integers(-128, 128, (4, 3, 3, 3))
    node = int_node(weight, pads=(1, 1, 1, 1))
    q = rng.integers(0, 256, (1, 3, 9, 9))
    prepared = int_conv_dfnt.prepare_weights(weight.astype(np.int8), 1, (1, 1), (1, 1))
    prepared["narrow"] = np.zeros((0, 1, 1, 1), np.int32)  # as if a weight residue were +2^31
    sums = int_conv_dfnt.convolve(np.pad(q, ((0, 0), (0, 0), (1, 1), (1, 1))), prepared, (9, 9))
    assert np.array_equal(sums.transpose(0, 3, 1, 2), int_conv.integer_accumulation(node, q))


@pytest.mark.parametrize("kernel_hw, strides, dilations, expected", [
    ((3, 3), (1, 1), (1, 1), "direct"), ((7, 7), (2, 2), (1, 1), "direct"), ((11, 11), (1, 1), (1, 1), "direct"),
    ((13, 13), (1, 1), (1, 1), "dfnt"), ((3, 3), (1, 1), (6, 6), "dfnt"), ((25, 25), (2, 2), (1, 1), "dfnt"),
    ((41, 41), (1, 1), (1, 1), "direct"),  # beyond the largest transform
])
def test_kernel_choice_follows_the_phase_kernel_size(kernel_hw, strides, dilations, expected):
    """Without AVX-512 VNNI the DFNT takes large phase kernels; with it the direct kernel takes all."""
    weight_shape = (8, 4) + kernel_hw
    assert int_conv.choose_kernel(weight_shape, list(strides), list(dilations), vnni=False) == expected
    assert int_conv.choose_kernel(weight_shape, list(strides), list(dilations), vnni=True) == "direct"
    assert int_conv.choose_kernel(weight_shape, list(strides), list(dilations)) == (
        "direct" if int_conv_direct.target_has_vnni() else expected)

# ---- without AVX-512 VNNI -----------------------------------------------------------------------

_GENERIC_CPU_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_int_conv import generic_cpu_case
from pabnn.engine.ops import int_conv
outputs = []
for quads in ("rows", "channels"):
    node, x = generic_cpu_case()
    outputs.append(int_conv.make_conv_kernel(node, "direct", quads)([x])[0])
np.save(sys.argv[1], np.stack(outputs))
"""


def generic_cpu_case():
    rng = np.random.default_rng(8)
    weight = np.where(rng.random((10, 3, 7, 7)) < 0.3, -128, rng.integers(-128, 128, (10, 3, 7, 7)))
    node = int_node(weight, strides=(2, 2), pads=(3, 3, 3, 3), zero_point=0, rng=rng, activation="relu")
    x = np.where(rng.random((2, 3, 21, 40)) < 0.3, 255, rng.integers(0, 256, (2, 3, 21, 40))).astype(np.float32)
    return node, x * np.float32(0.05)


def test_generic_cpu_gives_the_same_bits(tmp_path):
    """The direct kernel's generic multiply-add IR (taken where the target has no AVX-512 VNNI:
    NUMBA_CPU_NAME=generic) gives the same output as here and as the reference."""
    tests = str(pathlib.Path(__file__).parent)
    environment = dict(os.environ, NUMBA_CPU_NAME="generic", PABNN_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", _GENERIC_CPU_SCRIPT, str(tmp_path / "generic.npy"), tests],
                   env=environment, check=True, timeout=300)
    node, x = generic_cpu_case()
    expected = reference_float32(node, [x])
    for generic, quads in zip(np.load(tmp_path / "generic.npy"), ("rows", "channels")):
        assert np.array_equal(generic, expected)
        assert np.array_equal(int_conv.make_conv_kernel(node, "direct", quads)([x])[0], expected)
