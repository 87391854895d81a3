"""LRN (engine/ops/lrn.py): the numba kernel against the plain-numpy reference, the reference
against a direct loop over the ONNX definition, and the ONNX converter against onnxruntime."""
import numpy as np
import pytest
from onnx import helper
from test_onnx_import import assert_graph_matches, assert_matches_onnxruntime, make_model, ops_of
from tolerances import FLOAT32_RTOL, FLOAT64_RTOL, assert_close

from pabnn.converters import import_onnx
from pabnn.engine.errors import GraphError
from pabnn.engine.graph import Node
from pabnn.engine.ops import get_op

# (size, alpha, beta, bias): AlexNet/GoogLeNet's (5, 1e-4, 0.75, 1), ZFNet-like (3, ...), an even
# size (its window reaches one channel further up), a large alpha so the normalization matters.
SETTINGS = [(5, 1e-4, 0.75, 1.0), (3, 5e-2, 0.5, 2.0), (4, 0.2, 0.75, 1.0), (1, 1.0, 1.0, 0.5), (7, 0.5, 1.3, 1.5)]
SHAPES = [(2, 7, 5, 6), (1, 3, 4, 4), (3, 13, 2, 3), (2, 65, 3, 1)]  # odd channel counts, one below the window


def _node(size, alpha, beta, bias):
    return Node("LRN", "lrn", ["x"], ["y"], {"size": size, "alpha": alpha, "beta": beta, "bias": bias})


def _definition(x, size, alpha, beta, bias):
    """The ONNX definition, one output element at a time (plain Python loops)."""
    y = np.empty_like(x)
    channels = x.shape[1]
    for n, c in np.ndindex(x.shape[:2]):
        low, high = max(0, c - (size - 1) // 2), min(channels - 1, c + int(np.ceil((size - 1) / 2)))
        square_sum = sum(x[n, i] ** 2 for i in range(low, high + 1))
        y[n, c] = x[n, c] / (bias + alpha / size * square_sum) ** beta
    return y


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size, alpha, beta, bias", SETTINGS)
def test_kernel_and_reference_follow_the_definition(shape, size, alpha, beta, bias):
    x = 3.0 * np.random.default_rng(sum(shape) + size).standard_normal(shape)
    node = _node(size, alpha, beta, bias)
    op = get_op("LRN")
    assert op.infer_shapes(node, [(None,) + shape[1:]]) == [(None,) + shape[1:]]
    (reference,) = op.reference(node, [x])
    assert_close(reference, _definition(x, size, alpha, beta, bias), FLOAT64_RTOL, "reference")
    (fast,) = op.make_kernel(node)([x.astype(np.float32)])
    assert fast.dtype == np.float32
    assert_close(fast, reference, FLOAT32_RTOL, "kernel")


def test_one_hot_channel_reaches_its_window_only():
    """A single 1 in channel 3 of 9 halves exactly the channels whose window holds channel 3 (size 4:
    channels 1..4, whose windows reach one channel further up than down)."""
    x = np.zeros((1, 9, 1, 1))
    x[0, 3] = 1.0
    x[0, [0, 1, 2, 4, 5, 6, 7, 8]] = 1e-3  # small, so their own squares barely count
    for size, touched in ((3, {2, 3, 4}), (4, {1, 2, 3, 4}), (5, {1, 2, 3, 4, 5})):
        (y,) = get_op("LRN").make_kernel(_node(size, float(size), 1.0, 1.0))([x.astype(np.float32)])
        divided = {c for c in range(9) if y[0, c, 0, 0] < x[0, c, 0, 0] / 1.5}
        assert divided == touched, size


def test_zero_input_gives_zero_and_bad_attributes_name_the_node():
    (y,) = get_op("LRN").make_kernel(_node(5, 1e-4, 0.75, 1.0))([np.zeros((2, 3, 2, 2), np.float32)])
    assert not y.any()
    with pytest.raises(GraphError, match="'lrn'.*size"):
        get_op("LRN").infer_shapes(_node(0, 1e-4, 0.75, 1.0), [(None, 3, 4, 4)])
    with pytest.raises(GraphError, match="'lrn'.*beta"):
        get_op("LRN").infer_shapes(_node(3, 1e-4, float("nan"), 1.0), [(None, 3, 4, 4)])
    with pytest.raises(GraphError, match="'lrn'.*rank >= 3"):
        get_op("LRN").infer_shapes(_node(3, 1e-4, 0.75, 1.0), [(None, 3)])


@pytest.mark.parametrize("opset", [9, 13])
@pytest.mark.parametrize("channels", [3, 7, 13])
@pytest.mark.parametrize("size, alpha, beta, bias", [s for s in SETTINGS if s[0] % 2])
def test_onnx_lrn_matches_onnxruntime(opset, channels, size, alpha, beta, bias):
    rng = np.random.default_rng(channels + size)
    node = helper.make_node("LRN", ["x"], ["y"], name="lrn", size=size, alpha=alpha, beta=beta, bias=bias)
    model = make_model([node], (channels, 5, 4), opset=opset)
    graph = assert_matches_onnxruntime(model, 4.0 * rng.standard_normal((3, channels, 5, 4)).astype(np.float32))
    assert ops_of(graph) == ["LRN"]


@pytest.mark.parametrize("channels", [5, 8])
def test_onnx_lrn_even_size_follows_the_definition(channels):
    """onnxruntime refuses even sizes (its kernel asserts size % 2 == 1), and onnx's reference
    evaluator (onnx 1.23) loops over the batch axis where it means the channels; the ONNX
    definition is the oracle here: the window reaches one channel further up than down."""
    rng = np.random.default_rng(channels)
    node = helper.make_node("LRN", ["x"], ["y"], name="lrn", size=4, alpha=0.3, beta=0.75, bias=1.0)
    model = make_model([node], (channels, 3, 2), opset=13)
    x = 3.0 * rng.standard_normal((2, channels, 3, 2)).astype(np.float32)
    expected = _definition(x.astype(np.float64), 4, float(np.float32(0.3)), 0.75, 1.0)
    assert_graph_matches(import_onnx(model), {"y": expected}, x)


def test_onnx_lrn_default_attributes():
    model = make_model([helper.make_node("LRN", ["x"], ["y"], name="lrn", size=5)], (6, 3, 3), opset=13)
    graph = assert_matches_onnxruntime(model, 20.0 * np.random.default_rng(5).standard_normal((2, 6, 3, 3))
                                       .astype(np.float32))
    assert graph.nodes[0].attrs == {"size": 5, "alpha": pytest.approx(1e-4), "beta": 0.75, "bias": 1.0}
