"""AmxConv (engine/ops/amx_conv.py) and its AMX-INT8 micro-kernels (engine/amx.py): each intrinsic
against its plain-numpy twin, the op against PAConv's reference over the conv grid, and Sessions
with and without AMX on the same networks. The kernels run only where amx.available(); the plan's
choice and the Session's option are tested everywhere."""
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from test_pa_conv import GEOMETRIES, random_pa_node
from tolerances import PA_COMBINE_RTOL, assert_close

from pabnn.engine import Session, amx, run_reference
from pabnn.engine.graph import Graph, Node, TensorInfo
from pabnn.engine.ops import get_op
from pabnn.engine.ops.amx_conv import (AmxConvConfig, AmxConvRunner, Packing, computable, pack_codes_reference,
                                       pack_weight_tiles, qualifies)
from pabnn.engine.ops.pa_conv import binary_plane_steps
from pabnn.engine.plan import lower

needs_amx = pytest.mark.skipif(not amx.available(), reason="needs AMX-INT8 tiles (engine/amx.py: available)")


def binary_coded(node, n_thresholds, step=0.3):
    """`node` with the binary activation code of n_thresholds thresholds (uniform steps)."""
    node.attrs["act_coding"] = "binary"
    node.params["act_steps"] = binary_plane_steps(np.float32(step), n_thresholds)
    return node


def channels_last(x):
    """x [B, C, H, W] with its values in [B, H, W, C] order, in an array of x's shape (how the plan
    holds a channels-last tensor)."""
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)).reshape(x.shape)


def channel_major(y):
    b, c, h, w = y.shape
    return np.moveaxis(y.reshape(b, h, w, c), -1, 1)


# ---- the intrinsics ------------------------------------------------------------------------------

@needs_amx
@pytest.mark.parametrize("k_steps", [1, 9])
@pytest.mark.parametrize("a_stride", [64, 192, 100])
def test_amx_block_equals_its_reference(k_steps, a_stride):
    from numba import njit

    @njit
    def block(codes, offsets, k_steps, a_start, a_second, a_stride, weights, b_start, out):
        amx.amx_start()
        amx.amx_block(codes, offsets, k_steps, a_start, a_second, a_stride, weights, b_start, out)
        amx.amx_end()

    rng = np.random.default_rng(k_steps + a_stride)
    codes = rng.integers(0, 256, size=40000, dtype=np.uint8)  # any byte: q, or 0/1 planes
    weights = rng.integers(-128, 128, size=(k_steps + 2) * amx.STEP_BYTES, dtype=np.int8)
    offsets = rng.integers(0, 6000, size=k_steps).astype(np.int64)
    out = np.zeros(1024, dtype=np.int32)
    block(codes, offsets, k_steps, 17, 5000, a_stride, weights, 3 * 64, out)
    expected = amx.amx_block_reference(codes, offsets, k_steps, 17, 5000, a_stride, weights, 3 * 64)
    np.testing.assert_array_equal(out.reshape(32, 32), expected)


@needs_amx
@pytest.mark.parametrize("has_partial, has_residual, relu, last", [
    (False, False, False, 32), (True, True, True, 32), (True, False, True, 5), (False, True, False, 17)])
def test_row_epilogues_equal_their_references(has_partial, has_residual, relu, last):
    from numba import njit

    @njit
    def both(partial, scales, counts, constant, lowest, act, residual, has_partial, has_residual, relu, y, last):
        amx.add_scaled_row(partial, 32, scales, 3, counts, 64)
        amx.finish_row(partial, 32, has_partial, scales, 3, counts, 0, constant, lowest, 2, act, residual, 1,
                       has_residual, relu, y, 4, last)

    rng = np.random.default_rng(last)
    partial = rng.normal(size=96)
    scales = rng.normal(size=40)
    counts = rng.integers(-50, 300, size=128).astype(np.int32)
    constant, lowest = rng.normal(size=40), rng.normal(size=40)
    residual = rng.normal(size=40).astype(np.float32)
    residual[3] = np.nan  # a NaN stays NaN through the ReLU, as np.maximum
    y = np.full(40, 7.0, dtype=np.float32)
    expected_partial, expected_y = partial.copy(), y.copy()
    amx.add_scaled_row_reference(expected_partial, 32, scales, 3, counts, 64)
    amx.finish_row_reference(expected_partial, 32, has_partial, scales, 3, counts, 0, constant, lowest, 2, 0.7,
                             residual, 1, has_residual, relu, expected_y, 4, last)
    both(partial, scales, counts, constant, lowest, 0.7, residual, has_partial, has_residual, relu, y, last)
    np.testing.assert_array_equal(partial, expected_partial)
    np.testing.assert_array_equal(y, expected_y)  # the same float64 operations in the same order


# ---- the op --------------------------------------------------------------------------------------

def test_weight_tiles_hold_the_bits_by_step_tile_row_column_byte():
    """Unpacked by the layout the docstring states: a one-hot weight bit lands on one byte."""
    signs = np.zeros((2, 40, 70, 3, 3), dtype=bool)
    signs[1, 37, 66, 2, 1] = True  # plane 1, output 37 (pair 1, tile 0, column 5), channel 66 (chunk 1, row 0, byte 2)
    from pabnn.engine.bits import pack_weight_planes

    tile_bits, ones = pack_weight_tiles(pack_weight_planes(signs), 70)
    pairs, m_planes, chunks = 2, 2, 2
    tiles = amx.expand_rows_reference(tile_bits, 0, tile_bits.size).reshape(pairs * m_planes, 3, 3, chunks, 2, 16,
                                                                            16, 4)
    assert tiles.sum() == 1 and tiles[1 * m_planes + 1, 2, 1, 1, 0, 0, 5, 2] == 1
    ones = ones.reshape(3, 3, chunks, 2, 16, 16, 4)  # column 0 of tile 0 holds 1 for each of the 70 channels
    assert ones.sum() == 9 * 70 and np.all(ones[:, :, :, 0, :, 0, :].reshape(3, 3, -1)[..., :70] == 1)


@needs_amx
def test_expand_rows_equals_its_reference():
    from numba import njit

    @njit
    def expand(bits, start, count, out):
        amx.expand_rows(bits, start, count, out)

    bits = np.random.default_rng(0).integers(0, 2**63, size=9, dtype=np.int64).view(np.uint64)
    bits[4] = np.uint64(2**64 - 1)
    out = amx.aligned_empty(7 * 64 + 64, np.int8)
    out[:] = 5
    expand(bits, 2, 7, out)
    np.testing.assert_array_equal(out[:7 * 64], amx.expand_rows_reference(bits, 2, 7))
    assert np.all(out[7 * 64:] == 5)


@pytest.mark.parametrize("coding, n_thresholds", [("thermometer", 3), ("binary", 5)])
@pytest.mark.parametrize("channels", [3, 64, 70])
def test_codes_equal_their_reference(coding, n_thresholds, channels):
    from pabnn.engine.ops.amx_conv import _fill_padding_codes, _pack_codes_kernel, row_planes

    rng = np.random.default_rng(channels)
    node = random_pa_node(rng, 8, channels, act_bases=n_thresholds, pads=(2, 1, 0, 3),
                          padding_rule="value_before_quantizer", pad_value=0.4)
    if coding == "binary":
        binary_coded(node, n_thresholds)
    x = rng.normal(size=(2, channels, 5, 6)).astype(np.float32)
    x[0, 0, 0, :3] = [np.nan, np.inf, node.params["act_thresholds"][0, 0]]  # NaN is the lowest level; x >= s
    rows, padded_rows = row_planes(node)
    padded_channels = -(-channels // 64) * 64
    expected = pack_codes_reference(x, node.params["act_thresholds"], coding, (2, 1, 0, 3), 0.4, padded_rows,
                                    padded_channels)
    pad_codes = pack_codes_reference(np.full((1, channels, 1, 1), 0.4, np.float32), node.params["act_thresholds"],
                                     coding, (0, 0, 0, 0), 0.0, padded_rows, padded_channels)[0, 0, 0]
    image_bytes = expected[0].size
    codes = np.full((2, image_bytes + 100), 77, dtype=np.uint8)  # each image followed by slack
    _fill_padding_codes(codes, pad_codes, 2, 1, 5, 6, 7, 10, rows)  # the padded positions, then the inside
    _pack_codes_kernel(np.ascontiguousarray(np.moveaxis(x, 1, -1)), node.params["act_thresholds"],
                       coding == "binary", 2, 1, codes, 10, padded_rows, padded_channels, rows)
    np.testing.assert_array_equal(codes[:, :image_bytes].reshape(expected.shape)[..., :rows, :],
                                  expected[..., :rows, :])
    assert np.all(codes[:, image_bytes:] == 77)


LAYOUTS = [(False, False, False), (True, True, True), (True, False, True), (False, True, False)]


@needs_amx
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"k{g[0]}s{g[1]}p{g[2]}d{g[3]}")
@pytest.mark.parametrize("bases, coding", [((1, 1), "thermometer"), ((2, 3), "thermometer"), ((2, 2), "binary"),
                                           ((4, 5), "binary")], ids=lambda v: str(v))
@pytest.mark.parametrize("channels", [(3, 5), (64, 40), (130, 64)], ids=lambda c: f"{c[0]}to{c[1]}")
def test_amx_conv_equals_the_pa_reference(geometry, bases, coding, channels):
    """Every layout of input, residual and output, with ReLU, batch 2, at 1 and 2 threads."""
    kernel, strides, pads, dilations = geometry
    in_channels, out_channels = channels
    rng = np.random.default_rng(in_channels + out_channels + sum(bases))
    node = random_pa_node(rng, out_channels, in_channels, kernel, *bases, strides, pads, dilations)
    if coding == "binary":
        binary_coded(node, bases[1])
    if not computable(node):
        pytest.skip("a strided conv with 4 or more code rows per pixel: the AND-popcount kernels take it")
    node.attrs["activation"] = "relu"
    node.inputs = ["x", "shortcut"]
    x = rng.normal(size=(2, in_channels, 9, 7)).astype(np.float32)
    (without,) = get_op("PAConv").reference(node.__class__(node.op, node.name, ["x"], ["y"], node.attrs, node.params),
                                            [x.astype(np.float64)])
    shortcut = rng.normal(size=without.shape).astype(np.float32)
    (expected,) = get_op("PAConv").reference(node, [x.astype(np.float64), shortcut])
    previous = numba.get_num_threads()
    outputs = {}
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            for input_last, residual_last, output_last in LAYOUTS:
                run = AmxConvRunner(AmxConvConfig(node, input_last, residual_last, output_last))
                (y,) = run([channels_last(x) if input_last else x,
                            channels_last(shortcut) if residual_last else shortcut])
                y = channel_major(y) if output_last else y
                assert_close(y, expected, PA_COMBINE_RTOL,
                             f"AmxConv layouts {(input_last, residual_last, output_last)}, {threads} threads")
                outputs.setdefault(threads, []).append(y)
    finally:
        numba.set_num_threads(previous)
    for one, two in zip(outputs[1], outputs[2]):  # the same bits at every thread count and layout
        np.testing.assert_array_equal(one.view(np.uint32), two.view(np.uint32))
        np.testing.assert_array_equal(one.view(np.uint32), outputs[1][0].view(np.uint32))


@needs_amx
def test_one_small_image_splits_the_channel_pairs_over_the_threads():
    """An image with few blocks at more threads than images: the work items split the channel pairs
    (each expands its own pairs' weight tiles), with the same bits as one item per image, the
    reference's values, and the codes handed on and the residual read as at one thread."""
    rng = np.random.default_rng(6)
    node = binary_coded(random_pa_node(rng, 130, 130, act_bases=3), 3, 0.2)  # 27 steps, 3 blocks, 5 pairs
    shape = (1, 130, 9, 7)
    runner = AmxConvRunner(AmxConvConfig(node, False, False, False))
    per_item = runner.setup(shape, 2)[7]
    assert per_item == (runner.setup(shape, 1)[7][0], 3)  # all blocks, 3 of the 5 pairs per item
    x = rng.normal(size=shape).astype(np.float32)
    (expected,) = get_op("PAConv").reference(node, [x.astype(np.float64)])
    graph = binary_resnet_block(np.random.default_rng(7))
    block_input = rng.normal(size=(1, 64, 10, 9)).astype(np.float32)
    previous = numba.get_num_threads()
    outputs, blocks = [], []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            (y,) = AmxConvRunner(AmxConvConfig(node, False, False, False))([x])
            assert_close(y, expected, PA_COMBINE_RTOL, f"AmxConv of one image, {threads} threads")
            outputs.append(y)
            blocks.append(Session(graph, threads=threads, amx=True).run(["y"], {"x": block_input})[0])
    finally:
        numba.set_num_threads(previous)
    np.testing.assert_array_equal(outputs[0].view(np.uint32), outputs[1].view(np.uint32))
    np.testing.assert_array_equal(blocks[0].view(np.uint32), blocks[1].view(np.uint32))
    assert_close(blocks[0], run_reference(graph, {"x": block_input})["y"], PA_COMBINE_RTOL, "block, one image")


@needs_amx
def test_amx_conv_writes_into_the_planned_buffer_and_refuses_a_bad_shape():
    from pabnn.engine.errors import GraphError

    rng = np.random.default_rng(3)
    node = binary_coded(random_pa_node(rng, 32, 64, act_bases=3), 3)
    run = AmxConvRunner(AmxConvConfig(node))
    x = rng.normal(size=(1, 64, 6, 6)).astype(np.float32)
    out = np.empty((1, 32, 6, 6), dtype=np.float32)
    (y,) = run([x], out=out)
    assert y is out
    assert_close(out, get_op("PAConv").reference(node, [x.astype(np.float64)])[0], PA_COMBINE_RTOL, "out=")
    with pytest.raises(GraphError, match=r"'layer' \(AmxConv\): expects an input \[batch, 64"):
        run([rng.normal(size=(1, 65, 6, 6)).astype(np.float32)])


def test_which_layers_the_plan_gives_amx():
    rng = np.random.default_rng(0)
    binary = binary_coded(random_pa_node(rng, 8, 64, act_bases=3), 3)
    assert computable(binary) and qualifies(binary)
    assert not qualifies(binary_coded(random_pa_node(rng, 8, 64, act_bases=1), 1))  # one plane: as many passes
    thermometer = random_pa_node(rng, 8, 64, act_bases=3)
    assert computable(thermometer) and not qualifies(thermometer)
    assert not computable(binary_coded(random_pa_node(rng, 8, 64, act_bases=3, group=2), 3))
    assert not computable(binary_coded(random_pa_node(rng, 8, 64, act_bases=3,
                                                      padding_rule="zero_after_quantizer"), 3))
    strided = random_pa_node(rng, 8, 64, act_bases=3, strides=(2, 2))  # 3 rows -> 4 per pixel, strided
    assert not computable(strided)


# ---- Sessions ------------------------------------------------------------------------------------

def binary_resnet_block(rng, channels=64, n_thresholds=5):
    """x -> PAConv -> relu -> PAConv -> add(x) -> relu -> PAConv stride 2 (binary codes) -> y."""
    first = binary_coded(random_pa_node(rng, channels, channels, act_bases=n_thresholds), n_thresholds, 0.2)
    second = binary_coded(random_pa_node(rng, channels, channels, act_bases=n_thresholds), n_thresholds, 0.1)
    third = binary_coded(random_pa_node(rng, 32, channels, (1, 1), act_bases=n_thresholds, strides=(2, 2),
                                        pads=(0, 0, 0, 0)), n_thresholds, 0.1)
    first.name, first.inputs, first.outputs = "conv1", ["x"], ["c1"]
    second.name, second.inputs, second.outputs = "conv2", ["r1"], ["c2"]
    third.name, third.inputs, third.outputs = "down", ["s"], ["y"]
    nodes = [first, Node("Relu", "relu1", ["c1"], ["r1"]), second, Node("Add", "add", ["c2", "x"], ["a"]),
             Node("Relu", "relu2", ["a"], ["s"]), third]
    return Graph([TensorInfo("x", (None, channels, 10, 9))], ["y"], nodes)


def test_the_plan_holds_tensors_between_amx_convs_channels_last():
    graph = binary_resnet_block(np.random.default_rng(0))
    plan = lower(graph, amx=True)
    configs = {node.name: node.config for node in plan.nodes if node.op == "AmxConv"}
    assert set(configs) == {"conv1", "conv2", "down"}
    assert not configs["conv1"].input_last and configs["conv1"].output_last  # x: a graph input
    assert configs["conv2"].input_last and not configs["conv2"].residual_last and configs["conv2"].output_last
    assert configs["down"].input_last and not configs["down"].output_last  # y: a graph output
    kept = {node.name: node.config for node in lower(graph, keep=["r1"], amx=True).nodes if node.op == "AmxConv"}
    assert not kept["conv1"].output_last and not kept["conv2"].input_last
    assert all(node.op != "AmxConv" for node in lower(graph, amx=False).nodes)


@needs_amx
def test_a_session_with_amx_equals_one_without_and_the_reference():
    graph = binary_resnet_block(np.random.default_rng(1))
    x = np.random.default_rng(2).normal(size=(3, 64, 10, 9)).astype(np.float32)
    with_amx = Session(graph, amx=True)
    assert any(node.op == "AmxConv" for node in with_amx.plan_graph().nodes)
    (fast,) = with_amx.run(["y"], {"x": x})
    (popcount,) = Session(graph, amx=False).run(["y"], {"x": x})
    expected = run_reference(graph, {"x": x})["y"]
    assert_close(fast, expected, PA_COMBINE_RTOL, "AMX session vs reference executor")
    assert_close(popcount, expected, PA_COMBINE_RTOL, "popcount session vs reference executor")
    (kept, y) = with_amx.run(["r1", "y"], {"x": x})  # a requested intermediate comes out channel-major
    assert_close(kept, run_reference(graph, {"x": x}, keep=["r1"])["r1"], PA_COMBINE_RTOL, "kept r1")
    assert_close(y, expected, PA_COMBINE_RTOL, "y beside a kept r1")


@needs_amx
def test_later_runs_reuse_the_codes_and_give_what_a_new_session_gives(monkeypatch):
    """AmxConv keeps the codes it packs and hands on in the Session's state for the step
    (registry.Op.keeps_state): a later run at the same batch size makes none anew, and on new
    inputs and another batch size each run gives the same bits as a new Session."""
    graph = binary_resnet_block(np.random.default_rng(1))
    rng = np.random.default_rng(3)
    inputs = [rng.normal(size=(batch, 64, 10, 9)).astype(np.float32) for batch in (3, 3, 2, 3)]
    expected = [Session(graph, amx=True).run(["y"], {"x": x})[0] for x in inputs]
    session = Session(graph, amx=True)
    assert [node.op for node in session.plan_graph().nodes] == ["AmxConv"] * 3
    made = []
    empty_codes = Packing.empty_codes
    monkeypatch.setattr(Packing, "empty_codes", lambda self, *arguments: made.append(1) or
                        empty_codes(self, *arguments))
    counts = []
    for x, reference in zip(inputs, expected):
        (y,) = session.run(["y"], {"x": x})
        np.testing.assert_array_equal(y.view(np.uint32), reference.view(np.uint32))
        counts.append(len(made))
    # conv1's input codes and the two hand-offs: made in the first run, none in the second, and
    # anew for batch 2 and then for batch 3 again (the state goes with the Session's buffers, which
    # a new batch size replaces).
    assert counts == [3, 3, 6, 9]


def test_the_session_option(monkeypatch):
    graph = binary_resnet_block(np.random.default_rng(1))
    with pytest.raises(ValueError, match="amx must be"):
        Session(graph, amx="yes")
    monkeypatch.setattr(amx, "available", lambda: False)
    with pytest.raises(ValueError, match="not available here"):
        Session(graph, amx=True)
    assert all(node.op != "AmxConv" for node in Session(graph).plan_graph().nodes)


def test_amx_is_not_used_when_numba_compiles_for_another_cpu():
    code = "from pabnn.engine import amx; print(amx.available())"
    env = dict(os.environ, NUMBA_CPU_NAME="generic")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---- codes handed from one AmxConv to the next -----------------------------------------------------

def test_the_plan_hands_codes_to_the_next_amx_conv():
    graph = binary_resnet_block(np.random.default_rng(0))
    nodes = {node.name: node for node in lower(graph, amx=True).nodes}
    conv1, conv2, down = nodes["conv1"], nodes["conv2"], nodes["down"]
    # r1 has one reader, conv2: conv1 writes its codes only, and conv2 reads them.
    assert conv1.outputs == ["r1.codes"] and not conv1.config.writes_float
    assert conv1.config.codes_for is conv2.config.layer
    assert conv2.inputs == ["r1.codes", "x"] and conv2.config.input_hw == (10, 9)
    # s (conv2's output) goes to `down` only as well; y is a graph output: float32, no codes.
    assert conv2.outputs == ["s.codes"] and down.inputs == ["s.codes"] and down.config.codes_for is None
    kept = {node.name: node for node in lower(graph, keep=["r1"], amx=True).nodes}
    assert kept["conv1"].outputs == ["r1"] and kept["conv1"].config.codes_for is None
    assert kept["conv2"].inputs == ["r1", "x"] and kept["conv2"].config.input_hw is None


def two_readers(rng):
    """x -> PAConv -> relu -> r1; r1 -> PAConv -> y and r1 -> Relu -> z (a float reader too)."""
    first = binary_coded(random_pa_node(rng, 64, 64, act_bases=3), 3, 0.2)
    second = binary_coded(random_pa_node(rng, 40, 64, (3, 3), act_bases=3, pads=(2, 1, 0, 1)), 3, 0.1)
    first.name, first.inputs, first.outputs = "conv1", ["x"], ["c1"]
    second.name, second.inputs, second.outputs = "conv2", ["r1"], ["y"]
    nodes = [first, Node("Relu", "relu1", ["c1"], ["r1"]), second, Node("Relu", "relu2", ["r1"], ["z"])]
    return Graph([TensorInfo("x", (None, 64, 11, 7))], ["y", "z"], nodes)


@needs_amx
def test_handed_codes_are_the_packing_of_the_float_output_bit_for_bit():
    graph = two_readers(np.random.default_rng(4))
    x = np.random.default_rng(5).normal(size=(3, 64, 11, 7)).astype(np.float32)
    session = Session(graph, amx=True)
    nodes = {node.name: node for node in session.plan_graph().nodes}
    producer, reader = nodes["conv1"], nodes["conv2"]
    assert producer.config.writes_float and producer.outputs == ["r1", "r1.codes"]
    assert reader.inputs == ["r1.codes"] and reader.config.input_hw == (11, 7)
    y, codes = AmxConvRunner(producer.config)([x])
    # The codes are what the reader packs from the float32 output (pads (2, 1, 0, 1), pad codes
    # included), in every byte it reads; rows past R and the slack after each image are never read.
    expected = AmxConvRunner(reader.config.__class__(reader.config.layer))._pack(
        y, (2, 1, 0, 1), codes.shape[1])
    packing = Packing(reader.config.layer)
    image_bytes = 13 * 9 * packing.padded_rows * packing.padded_channels
    shape = (3, 13, 9, packing.padded_rows, packing.padded_channels)
    np.testing.assert_array_equal(codes[:, :image_bytes].reshape(shape)[..., :packing.rows, :64],
                                  expected[:, :image_bytes].reshape(shape)[..., :packing.rows, :64])
    # The reader reading them gives the same bits as packing the float output itself, and the reference.
    (from_codes,) = AmxConvRunner(reader.config)([codes])
    (from_float,) = AmxConvRunner(reader.config.__class__(reader.config.layer))([y])
    np.testing.assert_array_equal(from_codes, from_float)
    (reference_y, reference_codes) = get_op("AmxConv").reference(producer, [x.astype(np.float64)])
    assert_close(y, reference_y, PA_COMBINE_RTOL, "producer y")
    (from_reference_codes,) = get_op("AmxConv").reference(reader, [reference_codes])
    assert_close(from_codes, from_reference_codes, PA_COMBINE_RTOL, "reader from codes vs its reference")
    outputs = session.run(["y", "z"], {"x": x})
    expected_outputs = run_reference(graph, {"x": x})
    for name, output in zip(["y", "z"], outputs):
        assert_close(output, expected_outputs[name], PA_COMBINE_RTOL, name)


@needs_amx
@pytest.mark.parametrize("coding, n_thresholds", [("binary", 3), ("thermometer", 2), ("thermometer", 1)])
def test_strided_amx_conv_on_wide_maps_takes_blocks_per_output_row(coding, n_thresholds):
    """A stride-2 conv whose output rows fill 32-row blocks better than one sequence would (out_w 35,
    Wp 72), one and two rows per pixel; the small maps of the grid above take the sequence."""
    from pabnn.engine.ops.amx_conv import _blocks, row_planes

    rng = np.random.default_rng(n_thresholds)
    node = random_pa_node(rng, 40, 64, (3, 3), 2, n_thresholds, (2, 2), (1, 1, 1, 1))
    if coding == "binary":
        binary_coded(node, n_thresholds)
    rows, padded_rows = row_planes(node)
    _, a_stride, pixels, _ = _blocks(72, 3, 35, (2, 2), rows, padded_rows, 64)
    assert a_stride == 2 * padded_rows * 64 and len(pixels) == 3 * -(-35 // (32 // padded_rows))
    x = rng.normal(size=(2, 64, 5, 70)).astype(np.float32)
    (expected,) = get_op("PAConv").reference(node, [x.astype(np.float64)])
    (y,) = AmxConvRunner(AmxConvConfig(node))([x])
    assert_close(y, expected, PA_COMBINE_RTOL, f"stride 2, {coding} code of {n_thresholds}")


@needs_amx
def test_a_session_with_amx_runs_open_sizes_with_a_plan_per_size():
    graph = binary_resnet_block(np.random.default_rng(2))
    graph.inputs[0].symbols = (None, None, "H", "W")
    session = Session(graph, amx=True)
    for height, width in ((10, 9), (7, 16), (10, 9)):
        x = np.random.default_rng(height * width).normal(size=(2, 64, height, width)).astype(np.float32)
        (y,) = session.run(["y"], {"x": x})
        assert_close(y, run_reference(graph, {"x": x})["y"], PA_COMBINE_RTOL, f"size {height} x {width}")
    assert len(session.cached_plans()) == 2
