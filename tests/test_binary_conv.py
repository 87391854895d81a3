"""The plan-only ops of a lowered PAConv (engine/ops/pack_planes.py, engine/ops/binary_conv.py):
each kernel against its plain-numpy twin over the PAConv grid, and the BinaryConv reference
(decoding the planes) against the PAConv reference (quantizing the float input)."""
import numpy as np
import pytest
from test_pa_conv import random_pa_node
from tolerances import PA_COMBINE_RTOL, assert_close

from pabnn.engine.bits import PlanesLayout
from pabnn.engine.errors import GraphError
from pabnn.engine.graph import Graph, PlanNode, TensorInfo
from pabnn.engine.ops import get_op
from pabnn.engine.ops._binary_conv_kernel import SINGLE_THREAD_PIXELS, TILE_PIXELS, work_split
from pabnn.engine.ops.binary_conv import BinaryConvConfig
from pabnn.engine.ops.pa_conv import input_layout


def lowered(node, planes_pads=None, output_layout=None, writes_float=True):
    """(PackPlanes node, BinaryConv node) of PAConv `node`, its planes padded by `planes_pads`."""
    layout = input_layout(node)
    if planes_pads is not None:
        layout = PlanesLayout(layout.thresholds, layout.coding, tuple(planes_pads), layout.pad_value, layout.group)
    pack = PlanNode("PackPlanes", f"{node.name}.pack", [node.inputs[0]], ["planes"], config=layout)
    config = BinaryConvConfig(node, layout.pads, output_layout, writes_float)
    outputs = ["y"] if output_layout is None else ["y", "next"] if writes_float else ["next"]
    binary = PlanNode("BinaryConv", node.name, ["planes"] + node.inputs[1:], outputs, config=config)
    return pack, binary


def kernel_and_reference(node, inputs):
    fast = get_op(node.op).make_kernel(node)(inputs)
    reference = get_op(node.op).reference(node, [value.astype(np.float64) if value.dtype == np.float32 else value
                                                 for value in inputs])
    return fast, reference


# (case name, random_pa_node keyword arguments, input channels, output channels)
CASES = {
    "3x3-70": (dict(pads=(1, 1, 1, 1)), 70, 20),
    "5x5-stride2-asymmetric": (dict(kernel=(5, 5), strides=(2, 2), pads=(2, 1, 0, 2)), 65, 17),
    "dilated": (dict(pads=(2, 2, 2, 2), dilations=(2, 2)), 130, 16),
    "1x1-stride2": (dict(kernel=(1, 1), strides=(2, 2), pads=(0, 0, 0, 0)), 64, 33),
    "groups": (dict(pads=(1, 1, 1, 1), group=2), 130, 34),
    "depthwise": (dict(pads=(1, 1, 1, 1), group=12), 12, 12),
    "pad-minus-one": (dict(pads=(1, 1, 1, 1), padding_rule="value_before_quantizer", pad_value=-1.0), 70, 20),
    "zero-after": (dict(pads=(1, 2, 1, 2), padding_rule="zero_after_quantizer"), 70, 20),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("bases", [(1, 1), (2, 3)])
def test_pack_and_binary_conv_equal_their_twins_and_the_pa_conv_reference(case, bases):
    keywords, in_channels, out_channels = CASES[case]
    rng = np.random.default_rng(len(case) + 10 * bases[1])
    node = random_pa_node(rng, out_channels, in_channels, weight_bases=bases[0], act_bases=bases[1], **keywords)
    node.inputs, node.outputs = ["x"], ["y"]
    x = rng.normal(size=(2, in_channels, 9, 8)).astype(np.float32)
    pack, binary = lowered(node)
    (planes,), (planes_reference,) = kernel_and_reference(pack, [x])
    np.testing.assert_array_equal(planes, planes_reference)
    (y,), (y_reference,) = kernel_and_reference(binary, [planes])
    assert_close(y, y_reference, PA_COMBINE_RTOL, f"BinaryConv {case} kernel vs reference")
    # The twin from planes equals the PAConv reference from the float input.
    (pa_reference,) = get_op("PAConv").reference(node, [x.astype(np.float64)])
    assert_close(y_reference, pa_reference, 1e-12, f"BinaryConv vs PAConv reference, {case}")


def test_binary_conv_reads_its_input_from_inside_planes_padded_more():
    rng = np.random.default_rng(7)
    node = random_pa_node(rng, 20, 70, kernel=(1, 1), strides=(2, 2), pads=(0, 0, 0, 0))
    node.inputs, node.outputs = ["x"], ["y"]
    x = rng.normal(size=(2, 70, 9, 8)).astype(np.float32)
    pack, binary = lowered(node, planes_pads=(1, 2, 1, 0))
    (planes,) = get_op("PackPlanes").make_kernel(pack)([x])
    (y,), (y_reference,) = kernel_and_reference(binary, [planes])
    (own,) = get_op("PAConv").make_kernel(node)([x])
    np.testing.assert_array_equal(y, own)
    assert_close(y, y_reference, PA_COMBINE_RTOL, "1x1 stride 2 from wider planes")


@pytest.mark.parametrize("writes_float", [True, False])
def test_binary_conv_writes_the_planes_of_its_reader_with_a_residual(writes_float):
    rng = np.random.default_rng(8)
    node = random_pa_node(rng, 70, 20, pads=(1, 1, 1, 1))
    node.inputs, node.outputs = ["x", "r"], ["y"]
    node.attrs["activation"] = "relu"
    x = rng.normal(size=(2, 20, 7, 6)).astype(np.float32)
    residual = rng.normal(size=(2, 70, 7, 6)).astype(np.float32)
    reader = PlanesLayout(np.sort(rng.uniform(0, 1, (3, 70)), axis=0).astype(np.float32), "binary", (1, 0, 2, 1),
                          -0.5, 2)
    pack, binary = lowered(node, output_layout=reader, writes_float=writes_float)
    (planes,) = get_op("PackPlanes").make_kernel(pack)([x])
    fast, reference = kernel_and_reference(binary, [planes, residual])
    (float_output,) = get_op("PAConv").make_kernel(node)([x, residual])
    np.testing.assert_array_equal(fast[-1], reader.pack_reference(float_output))
    if writes_float:
        np.testing.assert_array_equal(fast[0], float_output)
        assert_close(fast[0], reference[0], PA_COMBINE_RTOL, "float output")
    assert len(fast) == len(reference) == (2 if writes_float else 1)
    # The reference's planes, packed from its float64 output rounded to float32, agree away from ties.
    assert np.mean(fast[-1] == reference[-1]) > 0.99


def test_binary_conv_refuses_planes_padded_less_than_its_layer():
    node = random_pa_node(np.random.default_rng(9), 8, 8, pads=(1, 1, 1, 1))
    node.inputs, node.outputs = ["x"], ["y"]
    _, binary = lowered(node, planes_pads=(1, 0, 1, 1))
    graph = Graph([TensorInfo("planes", (None, 8, 5, 5))], ["y"], [binary])
    with pytest.raises(GraphError, match="cannot hold the layer's own pads"):
        graph.infer_shapes()


@pytest.mark.parametrize("out_w", [6, 14, 28, 56, 100])
@pytest.mark.parametrize("threads", [1, 2])
def test_work_split_spreads_the_rows_evenly_over_its_chunks(out_w, threads):
    # The chunks are as many as TILE_PIXELS-sized ones would be (SINGLE_THREAD_PIXELS-sized ones at
    # one thread), all of one size but the last, which is short by fewer rows than there are chunks
    # (28 rows of 28 at 2 threads: 4 x 7, not 8, 8, 8, 4).
    pixels = SINGLE_THREAD_PIXELS if threads == 1 else TILE_PIXELS
    for out_h in range(1, 121):
        rows, blocks_per_split = work_split(1, out_h, out_w, 8, 1, True, threads)
        chunks = -(-out_h // rows)
        most_rows = max(1, pixels // out_w) if threads == 1 else -(-pixels // out_w)
        assert chunks == -(-out_h // min(out_h, most_rows)), (out_h, out_w)
        assert 0 <= chunks * rows - out_h < chunks, (out_h, out_w, rows)
        if threads == 1:
            assert blocks_per_split == 8 and (rows * out_w <= pixels or rows == 1)
    assert work_split(1, 28, 28, 8, 1, True, 2)[0] == 7
    assert work_split(1, 56, 56, 4, 1, True, 1) == (56, 4)  # ResNet-18's layer1: one item
    assert work_split(1, 7, 7, 32, 1, True, 2) == (7, 4)  # its layer4 at 2 threads: 8 channel ranges
    assert work_split(1, 28, 28, 8, 1, True, 2) == (7, 8)  # its layer2: 4 row chunks, 2 per thread
    assert work_split(1, 28, 28, 8, 1, True, 4)[1] == 4  # at 4 threads: 2 channel ranges
