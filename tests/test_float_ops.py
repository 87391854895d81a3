"""Float ops: each fast kernel against its plain-numpy reference, plus registry behaviour."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from tolerances import FLOAT32_RTOL, assert_close

from pabnn.engine.errors import GraphError
from pabnn.engine.graph import Node
from pabnn.engine.ops import get_op, registered_ops
from pabnn.engine.ops.registry import Op, register


def check(node, *inputs):
    op = get_op(node.op)
    shapes = op.infer_shapes(node, [(None,) + x.shape[1:] for x in inputs])
    fast = op.make_kernel(node)([x.astype(np.float32) for x in inputs])
    reference = op.reference(node, [x.astype(np.float64) for x in inputs])
    for f, r, shape in zip(fast, reference, shapes):
        assert f.dtype == np.float32
        assert f.shape[1:] == tuple(shape[1:]) and r.shape == f.shape
        assert_close(f, r, FLOAT32_RTOL, node.op)
    return fast


@pytest.mark.parametrize("in_channels,out_channels,group", [(3, 5, 1), (4, 6, 2), (6, 6, 6), (65, 7, 1)])
@pytest.mark.parametrize("kernel,strides,pads,dilations", [
    ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    ((3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    ((5, 5), (1, 1), (0, 2, 1, 2), (1, 1)),
    ((3, 2), (3, 2), (2, 0, 1, 3), (2, 3)),
])
def test_conv(in_channels, out_channels, group, kernel, strides, pads, dilations):
    rng = np.random.default_rng(in_channels)
    node = Node("Conv", "conv", ["x"], ["y"],
                {"strides": list(strides), "pads": list(pads), "dilations": list(dilations), "group": group},
                {"weight": rng.normal(size=(out_channels, in_channels // group) + kernel).astype(np.float32),
                 "bias": rng.normal(size=out_channels).astype(np.float32)})
    check(node, rng.normal(size=(2, in_channels, 8, 7)))


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("epilogue", ["none", "relu", "residual_relu"])
def test_conv_chunks_and_threads(monkeypatch, group, epilogue):
    """Chunks of output rows (here 2 rows of 5 columns each, 11 rows) on 1 or 2
    threads: the reference's results with the fused epilogue, and the same bits for every thread
    count (the chunks do not depend on it; the BLAS may round a chunk differently from a whole)."""

    from pabnn.engine.ops import conv

    rng = np.random.default_rng(5)
    attrs = {"pads": [1, 1, 1, 1], "group": group}
    if epilogue != "none":
        attrs["activation"] = "relu"
    node = Node("Conv", "conv", ["x"] + (["r"] if epilogue == "residual_relu" else []), ["y"], attrs,
                {"weight": rng.normal(size=(6, 6 // group, 3, 3)).astype(np.float32),
                 "bias": rng.normal(size=6).astype(np.float32)})
    inputs = [rng.normal(size=(2, 6, 11, 5))] + ([rng.normal(size=(2, 6, 11, 5))] if epilogue == "residual_relu" else [])
    monkeypatch.setattr(conv, "COLUMNS_PER_CHUNK", 10)  # 2 rows of 5 per chunk: 6 chunks per sample
    _assert_same_at_every_thread_count(node, inputs)


def test_conv_one_hot_input_with_power_of_two_weights():
    weight = (2.0 ** np.arange(9)).reshape(1, 1, 3, 3).astype(np.float32)
    node = Node("Conv", "conv", ["x"], ["y"], {"pads": [1, 1, 1, 1]},
                {"weight": weight, "bias": np.zeros(1, np.float32)})
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 2] = 1.0
    (y,) = check(node, x)
    # Output (oy, ox) sees the 1 through tap (1 - oy + 1, 2 - ox + 1).
    for oy in range(4):
        for ox in range(4):
            ky, kx = 1 - oy + 1, 2 - ox + 1
            expected = 2.0 ** (3 * ky + kx) if 0 <= ky < 3 and 0 <= kx < 3 else 0.0
            assert y[0, 0, oy, ox] == expected


def test_gemm():
    rng = np.random.default_rng(1)
    node = Node("Gemm", "fc", ["x"], ["y"], {}, {"weight": rng.normal(size=(10, 70)).astype(np.float32),
                                                  "bias": rng.normal(size=10).astype(np.float32)})
    check(node, rng.normal(size=(3, 70)))


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("kernel,strides,pads,extra", [
    ((2, 2), (2, 2), (0, 0, 0, 0), {}),
    ((3, 3), (2, 2), (1, 1, 1, 1), {}),
    ((3, 3), (1, 1), (1, 1, 1, 1), {"count_include_pad": 1}),
    ((3, 2), (1, 2), (0, 1, 2, 1), {}),
    ((3, 3), (3, 2), (1, 2, 0, 1), {"dilations": [1, 2]}),  # stride phases: taps 0 and 2 even, tap 1 odd
    ((2, 4), (2, 3), (1, 2, 0, 0), {}),
])
def test_pools(op, kernel, strides, pads, extra):
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "pads": list(pads), **extra}
    check(Node(op, "pool", ["x"], ["y"], attrs), np.random.default_rng(2).normal(size=(2, 3, 7, 6)))


def test_maxpool_dilation_and_nan():
    x = np.random.default_rng(3).normal(size=(1, 2, 7, 7))
    node = Node("MaxPool", "pool", ["x"], ["y"], {"kernel_shape": [2, 2], "dilations": [2, 2]})
    check(node, x)
    x[0, 0, 3, 3] = np.nan
    (y,) = get_op("MaxPool").make_kernel(node)([x.astype(np.float32)])
    (r,) = get_op("MaxPool").reference(node, [x])
    np.testing.assert_array_equal(np.isnan(y), np.isnan(r))
    assert np.isnan(y).sum() == 4


def test_global_average_pool_affine_add_relu_softmax_flatten_reshape():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 5, 4))
    check(Node("GlobalAveragePool", "gap", ["x"], ["y"]), x)
    check(Node("GlobalAveragePool", "gap", ["x"], ["y"]), rng.normal(size=(3, 70, 9, 11)) + 100.0)
    # Maps of 6 (fewer than the kernel's 8 partial sums) and 16 pixels; a single 1 averages exactly.
    for size in [(2, 3), (4, 4)]:
        one = np.zeros((1, 2) + size)
        one[0, 1, 1, 2] = 1.0
        (y,) = check(Node("GlobalAveragePool", "gap", ["x"], ["y"]), one)
        assert y[0, 0, 0, 0] == 0.0 and y[0, 1, 0, 0] == np.float32(1.0 / (size[0] * size[1]))
    check(Node("ChannelAffine", "bn", ["x"], ["y"], {}, {"scale": rng.normal(size=3).astype(np.float32),
                                                         "shift": rng.normal(size=3).astype(np.float32)}), x)
    check(Node("Add", "add", ["a", "b"], ["y"]), x, rng.normal(size=(2, 3, 5, 4)))
    check(Node("Add", "add", ["a", "b"], ["y"]), x, rng.normal(size=(1, 3, 1, 1)))
    (y,) = check(Node("Relu", "relu", ["x"], ["y"]), x)
    assert y.min() == 0.0
    (y,) = check(Node("Softmax", "softmax", ["x"], ["y"], {"axis": 1}), x)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)
    (y,) = check(Node("Flatten", "flatten", ["x"], ["y"]), x)
    assert y.shape == (2, 60)
    (y,) = check(Node("Reshape", "reshape", ["x"], ["y"], {"shape": [-1, 4]}), x)
    assert y.shape == (2, 15, 4)


def test_bad_attributes_name_the_node():
    node = Node("Conv", "my_conv", ["x"], ["y"], {"strides": [0, 1]},
                {"weight": np.zeros((2, 3, 3, 3), np.float32), "bias": np.zeros(2, np.float32)})
    with pytest.raises(GraphError, match="my_conv.*strides"):
        get_op("Conv").infer_shapes(node, [(None, 3, 8, 8)])
    node.attrs = {}
    with pytest.raises(GraphError, match="my_conv.*weight.*4 input channels"):
        get_op("Conv").infer_shapes(node, [(None, 4, 8, 8)])
    with pytest.raises(GraphError, match="my_conv.*does not fit"):
        get_op("Conv").infer_shapes(node, [(None, 3, 2, 2)])
    bad_reshape = Node("Reshape", "my_reshape", ["x"], ["y"], {"shape": [7]})
    with pytest.raises(GraphError, match="my_reshape"):
        get_op("Reshape").infer_shapes(bad_reshape, [(None, 3, 4)])


def test_registry_lists_ops_and_rejects_unknown_and_duplicate_names():
    names = [op.name for op in registered_ops()]
    assert names == sorted(names) and {"Conv", "PAConv", "PALinear", "Gemm", "MaxPool"} <= set(names)
    with pytest.raises(GraphError, match="node 'n1'.*unknown op 'Hardmax'.*supported ops: .*PAConv"):
        get_op("Hardmax", "n1")
    with pytest.raises(ValueError, match="registered twice"):
        register(Op("Conv", "again", None, None, None, None))


# Window geometries of the im2col tests: (kernel, strides, pads, dilations, input size).
WINDOW_CASES = [
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (6, 5)),
    ((7, 7), (2, 2), (3, 3, 3, 3), (1, 1), (11, 12)),
    ((3, 2), (3, 2), (2, 0, 1, 3), (2, 3), (10, 9)),
    ((2, 3), (2, 3), (4, 5, 0, 0), (1, 1), (3, 4)),  # pads larger than the kernel
    ((1, 1), (4, 4), (0, 0, 0, 0), (1, 1), (9, 7)),
]


@pytest.mark.parametrize("kernel,strides,pads,dilations,size", WINDOW_CASES)
def test_stride_phases_hold_every_window_tap(kernel, strides, pads, dilations, size):
    """The im2col source of the float Conv vs `window_view` (its plain twin): every tap of every
    output position, read from its stride phase, is the padded input's value there."""
    from pabnn.engine.ops.conv import stride_phases, window_view

    x = np.random.default_rng(0).normal(size=(2, 3) + size).astype(np.float32)
    windows = window_view(x, kernel, strides, pads, dilations)  # [B, C, kh, kw, out_h, out_w]
    out_hw = windows.shape[4:]
    phases = stride_phases(x, strides, pads, kernel, dilations, out_hw)
    for ky in range(kernel[0]):
        for kx in range(kernel[1]):
            dy, dx = ky * dilations[0], kx * dilations[1]
            run = phases[:, dy % strides[0], dx % strides[1], :, dy // strides[0]:dy // strides[0] + out_hw[0],
                         dx // strides[1]:dx // strides[1] + out_hw[1]]
            np.testing.assert_array_equal(run, windows[:, :, ky, kx])


@pytest.mark.parametrize("kernel,strides,pads,dilations,size", WINDOW_CASES)
def test_stride_phases_equal_the_padded_input_everywhere(kernel, strides, pads, dilations, size):
    """Every element of the stride phases that a tap reads, read by it or not, and the slack after
    them: the zero-padded input (zeros past its end), from a non-contiguous float32 input and a
    float64 one; the phases no tap reads (a 1x1 kernel at stride 4 reads one of 16) stay zero."""
    from pabnn.engine.ops.conv import stride_phases, window_view

    x = np.random.default_rng(2).normal(size=(2, 3) + size)
    out_hw = window_view(x, kernel, strides, pads, dilations).shape[4:]
    for source in (np.asfortranarray(x.astype(np.float32)), x):
        phases = stride_phases(source, strides, pads, kernel, dilations, out_hw, slack=16)
        _, sh, sw, _, rows, columns = phases.shape
        padded = np.zeros((2, 3, rows * sh + pads[0], columns * sw + pads[1]), dtype=np.float32)
        height, width = min(size[0], padded.shape[2] - pads[0]), min(size[1], padded.shape[3] - pads[1])
        padded[:, :, pads[0]:pads[0] + height, pads[1]:pads[1] + width] = x[:, :, :height, :width]
        read = {(ky * dilations[0] % sh, kx * dilations[1] % sw) for ky in range(kernel[0]) for kx in range(kernel[1])}
        for p in range(sh):
            for q in range(sw):
                expected = padded[:, :, p::sh, q::sw][:, :, :rows, :columns] if (p, q) in read else 0
                np.testing.assert_array_equal(phases[:, p, q], expected)
        np.testing.assert_array_equal(phases.base[phases.size:], np.zeros(16, dtype=np.float32))


# Winograd F(2x2, 3x3) (engine/ops/conv_winograd.py): the Conv's executor for 3x3, stride 1,
# dilation 1, one group and at least WINOGRAD_MIN_CHANNELS input channels.
@pytest.mark.parametrize("out_hw", [(6, 8), (7, 5), (1, 1), (2, 3)])
@pytest.mark.parametrize("channels", [1, 17])
def test_winograd_transforms_match_their_plain_twins(out_hw, channels):
    from pabnn.engine.ops import conv_winograd as winograd

    rng = np.random.default_rng(channels)
    tile_rows, tile_columns = winograd.tile_counts(out_hw)
    x = rng.normal(size=(channels, out_hw[0] + 1, out_hw[1] + 2)).astype(np.float32)
    padded = winograd.padded_sample(x, [1, 0, 0, 0], (tile_rows, tile_columns))
    np.testing.assert_array_equal(padded[:, 1:1 + x.shape[1], :x.shape[2]], x)
    assert not padded[:, 0].any() and not padded[:, 1 + x.shape[1]:].any() and not padded[:, :, x.shape[2]:].any()
    for first, stop in [(0, tile_rows), (tile_rows - 1, tile_rows)]:
        tiles = (stop - first) * tile_columns
        v = winograd.tile_planes(channels, tiles)
        winograd.input_tiles(padded, first, stop, v)
        assert_close(v, winograd.input_tiles_reference(padded, first, stop), FLOAT32_RTOL, "input tiles")
        m = rng.normal(size=(16, 3, tiles)).astype(np.float32)
        bias = rng.normal(size=3).astype(np.float32)
        y = np.full((3,) + out_hw, np.nan, dtype=np.float32)
        winograd.output_tiles(m, bias, first, stop, tile_columns, y)
        rows = slice(2 * first, min(2 * stop, out_hw[0]))
        assert_close(y[:, rows], winograd.output_tiles_reference(m, bias, first, stop, tile_columns, out_hw),
                     FLOAT32_RTOL, "output tiles")
        assert np.isnan(y[:, :rows.start]).all() and np.isnan(y[:, rows.stop:]).all()  # nothing else written


@pytest.mark.parametrize("in_channels,out_channels", [(16, 5), (33, 8)])
@pytest.mark.parametrize("pads,size", [
    ((1, 1, 1, 1), (8, 7)),
    ((0, 0, 0, 0), (9, 6)),
    ((2, 0, 1, 3), (5, 4)),
    ((0, 2, 2, 0), (3, 3)),
])
@pytest.mark.parametrize("epilogue", ["none", "residual_relu"])
def test_winograd_conv_matches_reference_and_threads_give_the_same_bits(monkeypatch, in_channels, out_channels,
                                                                         pads, size, epilogue):
    """The Conv through Winograd F(2x2, 3x3), in chunks of 3 tiles (partial tile rows, odd sizes),
    batch 2, with and without the fused epilogue, against the float64 direct reference; the same
    bits on 1 and 2 threads."""

    from pabnn.engine.ops import conv

    rng = np.random.default_rng(in_channels + size[0])
    attrs = {"pads": list(pads)} | ({"activation": "relu"} if epilogue != "none" else {})
    node = Node("Conv", "conv", ["x"] + (["r"] if epilogue != "none" else []), ["y"], attrs,
                {"weight": rng.normal(size=(out_channels, in_channels, 3, 3)).astype(np.float32),
                 "bias": rng.normal(size=out_channels).astype(np.float32)})
    assert conv.uses_winograd(node, node.params["weight"])
    x = rng.normal(size=(2, in_channels) + size)
    out_shape = get_op("Conv").infer_shapes(node, [(None,) + x.shape[1:]])[0]
    inputs = [x] + ([rng.normal(size=(2,) + out_shape[1:])] if epilogue != "none" else [])
    monkeypatch.setattr(conv, "WINOGRAD_TILES_PER_CHUNK", 3)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_TILES", 1)
    _assert_same_at_every_thread_count(node, inputs)


def test_winograd_conv_one_hot_input_with_power_of_two_weights(monkeypatch):
    """Channel 5 of 16 holds a single 1 and its taps weigh 2^0..2^8: every transform step is exact
    in float32, so each output is exactly the weight of the tap that saw the 1."""
    from pabnn.engine.ops import conv

    monkeypatch.setattr(conv, "WINOGRAD_MIN_TILES", 1)

    weight = np.zeros((2, 16, 3, 3), np.float32)
    weight[1, 5] = (2.0 ** np.arange(9)).reshape(3, 3)
    node = Node("Conv", "conv", ["x"], ["y"], {"pads": [1, 1, 1, 1]},
                {"weight": weight, "bias": np.zeros(2, np.float32)})
    assert conv.uses_winograd(node, weight)
    x = np.zeros((1, 16, 5, 4))
    x[0, 5, 2, 1] = 1.0
    (y,) = check(node, x)
    assert not y[0, 0].any()
    for oy in range(5):
        for ox in range(4):
            ky, kx = 2 - oy + 1, 1 - ox + 1
            expected = 2.0 ** (3 * ky + kx) if 0 <= ky < 3 and 0 <= kx < 3 else 0.0
            assert y[0, 1, oy, ox] == expected


@pytest.mark.parametrize("kernel,strides,pads,dilations,size", WINDOW_CASES)
def test_im2col_kernel_equals_the_window_view(kernel, strides, pads, dilations, size):
    """The float Conv's im2col kernel over a chunk of output rows vs the plain window view."""
    from pabnn.engine.ops.conv import _im2col, stride_phases, window_view

    x = np.random.default_rng(1).normal(size=(2, 3) + size).astype(np.float32)
    windows = window_view(x, kernel, strides, pads, dilations)  # [B, C, kh, kw, out_h, out_w]
    out_h, out_w = windows.shape[4:]
    phases = stride_phases(x, strides, pads, kernel, dilations, (out_h, out_w))
    first, stop = out_h // 3, out_h
    taps = np.full((3 * kernel[0] * kernel[1], (stop - first) * out_w), np.nan, dtype=np.float32)
    _im2col(phases[1], kernel[0], kernel[1], strides[0], strides[1], dilations[0], dilations[1], first, stop, out_w,
            taps)
    np.testing.assert_array_equal(taps, windows[1, :, :, :, first:stop].reshape(taps.shape))


def test_winograd_eligible_conv_on_a_small_output_runs_im2col(monkeypatch):
    """Below WINOGRAD_MIN_TILES tiles per sample the conv runs im2col (checked by making the
    Winograd transform unusable), with the reference's results."""
    from pabnn.engine.ops import conv, conv_winograd

    rng = np.random.default_rng(7)
    node = Node("Conv", "conv", ["x"], ["y"], {"pads": [1, 1, 1, 1]},
                {"weight": rng.normal(size=(4, 16, 3, 3)).astype(np.float32),
                 "bias": rng.normal(size=4).astype(np.float32)})
    monkeypatch.setattr(conv_winograd, "input_tiles", None)  # calling it would raise TypeError
    check(node, rng.normal(size=(2, 16, 7, 7)))  # 16 tiles < 32
    monkeypatch.setattr(conv, "WINOGRAD_MIN_TILES", 16)
    with pytest.raises(TypeError):
        check(node, rng.normal(size=(2, 16, 7, 7)))


def _assert_same_at_every_thread_count(node, inputs):
    """`check` of `node` on `inputs` at 1..NUMBA_NUM_THREADS threads: the outputs are identical."""
    import numba

    previous = numba.get_num_threads()
    try:
        outputs = []
        for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(threads)
            outputs.append(check(node, *inputs)[0])
    finally:
        numba.set_num_threads(previous)
    for output in outputs[1:]:
        np.testing.assert_array_equal(output, outputs[0])


DIRECT_CASES = [  # kernel, strides, pads, dilations, input size (outputs at least 16 wide)
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (5, 37)),
    ((5, 5), (2, 2), (2, 1, 0, 2), (1, 1), (9, 70)),
    ((7, 7), (2, 2), (3, 3, 3, 3), (1, 1), (8, 45)),
    ((3, 3), (1, 1), (2, 2, 2, 2), (2, 2), (4, 16)),
    ((3, 5), (1, 2), (0, 0, 1, 3), (2, 1), (7, 110)),
]


@pytest.mark.parametrize("in_channels", [1, 3, 4])
@pytest.mark.parametrize("kernel,strides,pads,dilations,size", DIRECT_CASES)
def test_direct_conv_matches_its_twin_and_the_reference(in_channels, kernel, strides, pads, dilations, size):
    """The direct kernel (few input channels; output channels 17 = two blocks of 8 and one
    channel, rows 16 to 70 wide: whole and partial vectors, several calls per row), batch 2, with
    the fused ReLU, against its plain twin and against the Conv reference."""
    from pabnn.engine.ops import conv
    from pabnn.engine.ops.conv_direct import direct_conv_reference

    rng = np.random.default_rng(in_channels * 10 + size[1])
    weight = rng.normal(size=(17, in_channels) + kernel).astype(np.float32)
    bias = rng.normal(size=17).astype(np.float32)
    node = Node("Conv", "conv", ["x"], ["y"], {"strides": list(strides), "pads": list(pads),
                                               "dilations": list(dilations), "activation": "relu"},
                {"weight": weight, "bias": bias})
    assert conv.uses_direct(node, weight)
    x = rng.normal(size=(2, in_channels) + size)
    (y,) = check(node, x)
    assert y.shape[3] >= 16
    expected = np.maximum(direct_conv_reference(x, weight, bias, strides, pads, dilations), 0)
    assert_close(y, expected, FLOAT32_RTOL, "direct conv vs its twin")


@pytest.mark.parametrize("in_channels,kernel,strides", [(100, (3, 3), (2, 2)), (40, (5, 5), (1, 2))])
def test_strided_direct_conv_with_many_taps_matches_the_reference(in_channels, kernel, strides):
    """A strided conv with up to DIRECT_MAX_STRIDED_TAPS taps (900, 1000) runs the direct kernel:
    batch 2, output channels 17, rows 16 wide, against the plain twin and the reference."""
    from pabnn.engine.ops import conv
    from pabnn.engine.ops.conv_direct import direct_conv_reference

    rng = np.random.default_rng(in_channels)
    weight = (rng.normal(size=(17, in_channels) + kernel) / np.sqrt(in_channels)).astype(np.float32)
    bias = rng.normal(size=17).astype(np.float32)
    pads = (kernel[0] // 2,) * 4
    node = Node("Conv", "conv", ["x"], ["y"], {"strides": list(strides), "pads": list(pads)},
                {"weight": weight, "bias": bias})
    assert conv.uses_direct(node, weight)
    x = rng.normal(size=(2, in_channels, 9, 32))
    (y,) = check(node, x)
    assert y.shape[3] >= 16
    expected = direct_conv_reference(x, weight, bias, strides, pads, (1, 1))
    assert_close(y, expected, FLOAT32_RTOL, "strided direct conv vs its twin")


@pytest.mark.parametrize("epilogue", ["none", "residual_relu"])
@pytest.mark.parametrize("weight_shape,attrs,size,out_size", [
    ((12, 3, 7, 7), {"strides": [2, 2], "pads": [3, 3, 3, 3]}, (12, 40), (6, 20)),  # direct
    ((130, 40, 1, 1), {}, (20, 30), (20, 30)),  # pointwise: 13 chunks x 3 channel ranges of work items
])
def test_direct_and_pointwise_convs_threads_give_the_same_bits(epilogue, weight_shape, attrs, size, out_size):
    from pabnn.engine.ops import conv

    rng = np.random.default_rng(11)
    attrs = attrs | ({"activation": "relu"} if epilogue != "none" else {})
    out_channels, in_channels = weight_shape[:2]
    node = Node("Conv", "conv", ["x"] + (["r"] if epilogue != "none" else []), ["y"], attrs,
                {"weight": rng.normal(size=weight_shape).astype(np.float32),
                 "bias": rng.normal(size=out_channels).astype(np.float32)})
    assert conv.uses_direct(node, node.params["weight"]) or conv.uses_pointwise(node, node.params["weight"])
    inputs = [rng.normal(size=(2, in_channels) + size)]
    inputs += [rng.normal(size=(2, out_channels) + out_size)] if epilogue != "none" else []
    _assert_same_at_every_thread_count(node, inputs)


def test_direct_conv_one_hot_input_with_power_of_two_weights():
    """Channel 2 of 3 holds a single 1 and its 3x3 taps weigh 2^0..2^8 (output channel 9 of 10):
    each output is exactly the weight of the tap that saw the 1, and nothing else is written."""
    from pabnn.engine.ops import conv

    weight = np.zeros((10, 3, 3, 3), np.float32)
    weight[9, 2] = (2.0 ** np.arange(9)).reshape(3, 3)
    node = Node("Conv", "conv", ["x"], ["y"], {"pads": [1, 1, 1, 1]},
                {"weight": weight, "bias": np.zeros(10, np.float32)})
    assert conv.uses_direct(node, weight)
    x = np.zeros((1, 3, 4, 19))
    x[0, 2, 2, 17] = 1.0
    (y,) = check(node, x)
    assert not y[0, :9].any()
    for oy in range(4):
        for ox in range(19):
            ky, kx = 2 - oy + 1, 17 - ox + 1
            assert y[0, 9, oy, ox] == (2.0 ** (3 * ky + kx) if 0 <= ky < 3 and 0 <= kx < 3 else 0.0)


def test_direct_conv_selection_rule(monkeypatch):
    """Direct: one group, a kernel above 1x1, C * kh * kw <= DIRECT_MAX_TAPS (DIRECT_MAX_STRIDED_TAPS
    at a stride above 1), and (at run time) outputs at least 16 wide; or several groups with
    C/group * kh * kw <= DIRECT_MAX_TAPS, at any output width; otherwise im2col (checked by making
    the direct kernel unusable)."""
    from pabnn.engine.ops import conv, conv_direct

    def node_for(in_channels, kernel, group=1, stride=1):
        rng = np.random.default_rng(0)
        return Node("Conv", "conv", ["x"], ["y"], {"pads": [kernel // 2] * 4, "group": group, "strides": [1, stride]},
                    {"weight": rng.normal(size=(8, in_channels // group, kernel, kernel)).astype(np.float32),
                     "bias": np.zeros(8, np.float32)})

    for in_channels, kernel, group, stride, direct in [
            (3, 7, 1, 1, True), (32, 3, 1, 1, True), (33, 3, 1, 1, False), (128, 3, 1, 2, True),
            (129, 3, 1, 2, False), (64, 1, 1, 1, False), (4, 3, 2, 1, True), (8, 1, 8, 1, True), (66, 3, 2, 1, False),
            (66, 3, 2, 2, False)]:
        node = node_for(in_channels, kernel, group, stride)
        assert conv.uses_direct(node, node.params["weight"]) == direct, (in_channels, kernel, group, stride)
    monkeypatch.setattr(conv_direct, "direct_conv", None)  # calling it would raise TypeError
    node = node_for(3, 7)
    x = np.random.default_rng(1).normal(size=(1, 3, 6, 15))
    check(node, x)  # 15 columns: im2col
    with pytest.raises(TypeError):
        check(node, np.random.default_rng(1).normal(size=(1, 3, 6, 16)))
    with pytest.raises(TypeError):  # grouped: direct on narrow rows too
        check(node_for(8, 3, 8), np.random.default_rng(1).normal(size=(1, 8, 6, 5)))


POINTWISE_CASES = [  # strides, pads, input size: 1 to 700 output pixels (chunks of 48, ranges of chunks)
    ((1, 1), (0, 0, 0, 0), (1, 1)),
    ((1, 1), (0, 0, 0, 0), (7, 7)),
    ((1, 1), (0, 0, 0, 0), (20, 35)),
    ((1, 1), (0, 0, 0, 0), (16, 20)),  # 320 pixels, whole vectors: x read in place
    ((1, 1), (0, 0, 0, 0), (4, 4)),
    ((2, 2), (0, 0, 0, 0), (13, 11)),
    ((1, 2), (1, 0, 2, 1), (9, 14)),
]


@pytest.mark.parametrize("in_channels", [1, 3, 70, 700])
@pytest.mark.parametrize("strides,pads,size", POINTWISE_CASES)
def test_pointwise_conv_matches_its_twin_and_the_reference(in_channels, strides, pads, size):
    """1x1 convs (conv_direct.pointwise_conv; output channels 17 = two blocks of 8 and one
    channel; pixels from 1 to 700: whole and partial 48-pixel chunks, one or several work items,
    padded borders where the output is the bias, the input read in place when its rows end on whole
    vectors), batch 2, with the fused ReLU, against the direct
    conv's plain twin and against the Conv reference."""
    from pabnn.engine.ops import conv
    from pabnn.engine.ops.conv_direct import direct_conv_reference

    rng = np.random.default_rng(in_channels * 10 + size[1])
    weight = rng.normal(size=(17, in_channels, 1, 1)).astype(np.float32)
    bias = rng.normal(size=17).astype(np.float32)
    node = Node("Conv", "conv", ["x"], ["y"], {"strides": list(strides), "pads": list(pads), "activation": "relu"},
                {"weight": weight, "bias": bias})
    assert conv.uses_pointwise(node, weight) and not conv.uses_direct(node, weight)
    x = rng.normal(size=(2, in_channels) + size)
    (y,) = check(node, x)
    expected = np.maximum(direct_conv_reference(x, weight, bias, strides, pads, (1, 1)), 0)
    assert_close(y, expected, FLOAT32_RTOL, "pointwise conv vs its twin")


def test_pointwise_conv_one_hot_input_with_power_of_two_weights():
    """Input channel c of 9 holds a single 1 at pixel 50 + c (of 66, the second chunk) and output
    channel 9 weighs it 2^c: output channel 9 is exactly 2^c at pixel 50 + c, every other output 0."""
    from pabnn.engine.ops import conv

    weight = np.zeros((10, 9, 1, 1), np.float32)
    weight[9, :, 0, 0] = 2.0 ** np.arange(9)
    node = Node("Conv", "conv", ["x"], ["y"], {}, {"weight": weight, "bias": np.zeros(10, np.float32)})
    assert conv.uses_pointwise(node, weight)
    x = np.zeros((1, 9, 6, 11))
    for c in range(9):
        x[0, c].reshape(-1)[50 + c] = 1.0
    (y,) = check(node, x)
    assert not y[0, :9].any()
    expected = np.zeros(66)
    expected[50:59] = 2.0 ** np.arange(9)
    np.testing.assert_array_equal(y[0, 9].reshape(-1), expected)


def test_pointwise_conv_selection_rule(monkeypatch):
    """Pointwise: a 1x1 kernel and one group, at any input channels; a grouped 1x1 conv runs im2col
    (checked by making the pointwise kernel unusable)."""
    from pabnn.engine.ops import conv, conv_direct

    def node_for(in_channels, kernel, group=1):
        rng = np.random.default_rng(0)
        return Node("Conv", "conv", ["x"], ["y"], {"group": group},
                    {"weight": rng.normal(size=(8, in_channels // group, kernel, kernel)).astype(np.float32),
                     "bias": np.zeros(8, np.float32)})

    for in_channels, kernel, group, pointwise in [(3, 1, 1, True), (2048, 1, 1, True), (4, 1, 2, False),
                                                  (3, 3, 1, False)]:
        node = node_for(in_channels, kernel, group)
        assert conv.uses_pointwise(node, node.params["weight"]) == pointwise, (in_channels, kernel, group)
    monkeypatch.setattr(conv_direct, "pointwise_conv", None)  # calling it would raise TypeError
    check(node_for(4, 1, 2), np.random.default_rng(1).normal(size=(1, 4, 3, 5)))
    with pytest.raises(TypeError):
        check(node_for(4, 1), np.random.default_rng(1).normal(size=(1, 4, 3, 5)))


GROUPED_CASES = [  # in channels, out channels, group, kernel, strides, pads, dilations, input size
    (12, 12, 12, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (9, 70)),  # depthwise, rows of 70: two calls
    (12, 12, 12, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), (11, 40)),  # depthwise at stride 2, 20 columns
    (10, 10, 10, (5, 5), (2, 2), (2, 2, 2, 2), (1, 1), (13, 13)),  # narrow (7 columns): virtual rows
    (6, 12, 6, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), (7, 9)),  # channel multiplier 2, dilated, narrow
    (6, 18, 2, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (5, 33)),  # groups of 9 outputs: blocks of 8 and 1
    (8, 6, 2, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), (9, 35)),  # grouped 1x1
]


@pytest.mark.parametrize("in_channels,out_channels,group,kernel,strides,pads,dilations,size", GROUPED_CASES)
def test_grouped_direct_conv_matches_the_reference(in_channels, out_channels, group, kernel, strides, pads,
                                                    dilations, size):
    """Grouped and depthwise convs on the direct kernel (wide rows, and narrow ones laid end to
    end), batch 2, with the fused ReLU, against the Conv reference (im2col per group's plain twin)."""
    from pabnn.engine.ops import conv

    rng = np.random.default_rng(in_channels + 100 * group + size[1])
    weight = rng.normal(size=(out_channels, in_channels // group) + kernel).astype(np.float32)
    node = Node("Conv", "conv", ["x"], ["y"], {"strides": list(strides), "pads": list(pads),
                                               "dilations": list(dilations), "group": group, "activation": "relu"},
                {"weight": weight, "bias": rng.normal(size=out_channels).astype(np.float32)})
    assert conv.uses_direct(node, weight)
    check(node, rng.normal(size=(2, in_channels) + size))


@pytest.mark.parametrize("size", [(6, 40), (6, 9)])
def test_depthwise_conv_threads_give_the_same_bits(size):
    """A depthwise 3x3 conv with a residual and ReLU, wide (40 columns) and narrow (9) rows."""
    rng = np.random.default_rng(13)
    node = Node("Conv", "conv", ["x", "r"], ["y"], {"pads": [1, 1, 1, 1], "group": 24, "activation": "relu"},
                {"weight": rng.normal(size=(24, 1, 3, 3)).astype(np.float32),
                 "bias": rng.normal(size=24).astype(np.float32)})
    _assert_same_at_every_thread_count(node, [rng.normal(size=(2, 24) + size), rng.normal(size=(2, 24) + size)])


@pytest.mark.parametrize("size", [(4, 19), (4, 7)])
def test_depthwise_conv_one_hot_input_with_power_of_two_weights(size):
    """Channel c of 3 holds a single 1 and its 3x3 taps weigh 2^0..2^8 times 4^c: channel c's outputs
    are exactly the weight of the tap that saw its 1, on wide and on narrow rows."""
    weight = np.stack([(2.0 ** np.arange(9)).reshape(1, 3, 3) * 4.0 ** c for c in range(3)]).astype(np.float32)
    node = Node("Conv", "conv", ["x"], ["y"], {"pads": [1, 1, 1, 1], "group": 3},
                {"weight": weight, "bias": np.zeros(3, np.float32)})
    x = np.zeros((1, 3) + size)
    ones = [(1, 2), (2, size[1] - 1), (3, 0)]
    for c, (y1, x1) in enumerate(ones):
        x[0, c, y1, x1] = 1.0
    (y,) = check(node, x)
    for c, (y1, x1) in enumerate(ones):
        for oy in range(size[0]):
            for ox in range(size[1]):
                ky, kx = y1 - oy + 1, x1 - ox + 1
                expected = 2.0 ** (3 * ky + kx) * 4.0 ** c if 0 <= ky < 3 and 0 <= kx < 3 else 0.0
                assert y[0, c, oy, ox] == expected, (c, oy, ox)


_GENERIC_CPU_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_float_ops import generic_cpu_outputs
np.savez(sys.argv[1], *generic_cpu_outputs())
"""


def generic_cpu_outputs():
    """The direct float kernels' outputs the generic-CPU test compares: depthwise on wide and on
    narrow rows, grouped, pointwise and the stem-like 7x7/2 conv, each with the fused ReLU, and that
    conv with a 3x3/2 max-pool as one ConvMaxPool (its micro-kernel, the pooling helpers, the stride
    phases' kernel)."""
    from pabnn.engine.graph import PlanNode
    from pabnn.engine.ops.conv_max_pool import ConvMaxPoolConfig

    rng = np.random.default_rng(9)
    outputs = []
    for in_channels, out_channels, kernel, stride, group, size in [
            (24, 24, 3, 1, 24, (9, 40)), (24, 24, 5, 2, 24, (13, 13)), (16, 18, 3, 2, 2, (11, 37)),
            (40, 130, 1, 1, 1, (20, 30)), (3, 17, 7, 2, 1, (12, 45))]:
        node = Node("Conv", "conv", ["x"], ["y"], {"strides": [stride, stride], "pads": [kernel // 2] * 4,
                                                   "group": group, "activation": "relu"},
                    {"weight": rng.normal(size=(out_channels, in_channels // group, kernel, kernel)).astype(np.float32),
                     "bias": rng.normal(size=out_channels).astype(np.float32)})
        x = rng.normal(size=(2, in_channels) + size).astype(np.float32)
        outputs.append(get_op("Conv").make_kernel(node)([x])[0])
    pool = Node("MaxPool", "pool", ["y"], ["p"], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})
    fused = PlanNode("ConvMaxPool", "conv", ["x"], ["p"], config=ConvMaxPoolConfig(node, pool))
    outputs.append(get_op("ConvMaxPool").make_kernel(fused)([x])[0])
    return outputs


def test_direct_float_kernels_give_the_same_bits_on_a_generic_cpu(tmp_path):
    """The direct float micro-kernels' IR legalized for a CPU without AVX-512 (NUMBA_CPU_NAME=generic:
    split vectors, scalar fma) gives the same outputs as on this machine."""
    tests = str(pathlib.Path(__file__).parent)
    environment = dict(os.environ, NUMBA_CPU_NAME="generic", PABNN_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", _GENERIC_CPU_SCRIPT, str(tmp_path / "generic.npz"), tests],
                   env=environment, check=True, timeout=600)
    generic = np.load(tmp_path / "generic.npz")
    for name, here in zip(generic.files, generic_cpu_outputs()):
        np.testing.assert_array_equal(generic[name].view(np.uint32), here.view(np.uint32))
