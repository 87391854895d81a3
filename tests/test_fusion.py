"""fuse_epilogues and the fused epilogue of Conv/PAConv, against the unfused reference; the graphs
that tests/test_plan.py lowers."""
import numpy as np
import pytest
from test_pa_conv import random_pa_node
from tolerances import FLOAT32_RTOL, PA_COMBINE_RTOL, assert_close

from pabnn.engine import Session, run_reference
from pabnn.engine.fusion import fuse_epilogues
from pabnn.engine.graph import Graph, Node, TensorInfo
from pabnn.engine.ops import get_op


def conv_node(rng, name, x, y, channels):
    return Node("Conv", name, [x], [y], {"pads": [1, 1, 1, 1]},
                {"weight": rng.normal(size=(channels, channels, 3, 3)).astype(np.float32) * 0.2,
                 "bias": rng.normal(size=channels).astype(np.float32)})


def residual_block(rng, op):
    """x -> conv -> relu -> conv -> add(x) -> relu, with `op` (Conv or PAConv) for both convs."""
    channels = 70
    if op == "PAConv":
        first = random_pa_node(rng, channels, channels, pads=(1, 1, 1, 1))
        second = random_pa_node(rng, channels, channels, pads=(1, 1, 1, 1))
        first.name, first.inputs, first.outputs = "conv1", ["x"], ["c1"]
        second.name, second.inputs, second.outputs = "conv2", ["r1"], ["c2"]
    else:
        first, second = conv_node(rng, "conv1", "x", "c1", channels), conv_node(rng, "conv2", "r1", "c2", channels)
    nodes = [first, Node("Relu", "relu1", ["c1"], ["r1"]), second,
             Node("Add", "add", ["c2", "x"], ["s"]), Node("Relu", "relu2", ["s"], ["y"])]
    return Graph([TensorInfo("x", (None, channels, 6, 5))], ["y"], nodes)


@pytest.mark.parametrize("op", ["Conv", "PAConv"])
def test_block_fuses_to_two_nodes_with_the_same_outputs(op):
    rng = np.random.default_rng(0)
    graph = residual_block(rng, op)
    fused = fuse_epilogues(graph)
    assert [(n.name, n.inputs, n.outputs, n.attrs.get("activation")) for n in fused.nodes] == [
        ("conv1", ["x"], ["r1"], "relu"), ("conv2", ["r1", "x"], ["y"], "relu")]
    x = rng.normal(size=(2, 70, 6, 5)).astype(np.float32)
    # Each fused node, kernel vs reference, on the same inputs.
    values = {"x": x}
    rtol = PA_COMBINE_RTOL if op == "PAConv" else FLOAT32_RTOL
    for node in fused.nodes:
        inputs = [values[name] for name in node.inputs]
        (fast,) = get_op(node.op).make_kernel(node)(inputs)
        (reference,) = get_op(node.op).reference(node, [v.astype(np.float64) for v in inputs])
        assert_close(fast, reference, rtol, node.name)
        assert fast.min() >= 0.0
        values[node.outputs[0]] = fast
    # The fused reference equals the unfused reference.
    assert_close(run_reference(fused, {"x": x})["y"], run_reference(graph, {"x": x})["y"], 1e-12, "fused vs plain")


def test_kept_tensors_graph_outputs_and_shared_outputs_are_not_fused():
    rng = np.random.default_rng(1)
    graph = residual_block(rng, "Conv")
    assert [n.op for n in fuse_epilogues(graph, keep=["c1"]).nodes] == ["Conv", "Relu", "Conv"]
    graph.outputs = ["y", "c2"]
    assert [n.op for n in fuse_epilogues(graph).nodes] == ["Conv", "Conv", "Add", "Relu"]
    shared = Graph(graph.inputs, ["y", "c1"], graph.nodes)
    assert [n.op for n in fuse_epilogues(shared).nodes][:2] == ["Conv", "Relu"]


def test_session_runs_fused_and_still_serves_intermediate_tensors():
    rng = np.random.default_rng(2)
    graph = residual_block(rng, "PAConv")
    x = rng.normal(size=(1, 70, 6, 5)).astype(np.float32)
    session = Session(graph, amx=False)
    (y,) = session.run(None, {"x": x})
    reference = run_reference(graph, {"x": x}, keep=["c2"])
    (c2,) = session.run(["c2"], {"x": x})  # fused away in the default plan
    assert_close(c2, reference["c2"], PA_COMBINE_RTOL, "intermediate")
    assert y.shape == (1, 70, 6, 5) and (y >= 0).all()


# Producer PAConv -> (Relu | Add residual | nothing) -> consumer PAConv: the consumer's input
# channels (not multiples of 64 but one), groups (depthwise included), pads (asymmetric included),
# padding rules, and producer strides; the two layers have different act_bases.
HANDOFF_CASES = {
    "relu": dict(channels=70, strides=(1, 1), pads=(1, 1, 1, 1), group=1, rule="zero_before_quantizer",
                 pad_value=None, epilogue="relu"),
    "residual-group2-pad-1": dict(channels=130, strides=(2, 2), pads=(0, 2, 1, 0), group=2,
                                  rule="value_before_quantizer", pad_value=-1.0, epilogue="residual"),
    "zero-after": dict(channels=64, strides=(1, 1), pads=(2, 2, 2, 2), group=1, rule="zero_after_quantizer",
                       pad_value=None, epilogue=None),
    "split-channels": dict(channels=192, strides=(1, 1), pads=(1, 1, 1, 1), group=1, rule="zero_before_quantizer",
                           pad_value=None, epilogue="residual"),
    "depthwise": dict(channels=12, strides=(2, 1), pads=(1, 1, 1, 1), group=12, rule="zero_before_quantizer",
                      pad_value=None, epilogue="relu"),
    # Thermometer planes of 16-channel blocks, written by the micro-kernel itself (PlanesWriter.in_registers).
    "relu-in-registers": dict(channels=96, strides=(1, 1), pads=(1, 1, 1, 1), group=1, rule="zero_before_quantizer",
                              pad_value=None, epilogue="relu"),
    "group2-in-registers": dict(channels=96, strides=(2, 1), pads=(0, 1, 2, 1), group=2, rule="value_before_quantizer",
                                pad_value=-1.0, epilogue=None),
}


def handoff_chain(rng, case, ties=True):
    """(graph x [, r] -> producer -> epilogue -> consumer -> y, feeds). The consumer's thresholds
    are quantiles of the producer's output per channel; with `ties`, its lowest threshold of each
    channel is a value that the engine's float32 output takes (x >= s holds exactly there; the
    float64 reference computes a slightly different value, so it may fall either side)."""
    channels = case["channels"]
    producer = random_pa_node(rng, channels, 20, strides=case["strides"], act_bases=2)
    producer.name, producer.inputs, producer.outputs = "producer", ["x"], ["c1"]
    consumer = random_pa_node(rng, channels, channels, pads=case["pads"], act_bases=3, group=case["group"],
                              padding_rule=case["rule"], pad_value=case["pad_value"])
    consumer.name, consumer.inputs, consumer.outputs = "consumer", ["p"], ["y"]
    x = rng.normal(size=(2, 20, 9, 7)).astype(np.float32)
    (c1,) = get_op("PAConv").make_kernel(producer)([x])
    inputs = [TensorInfo("x", (None, 20, 9, 7))]
    feeds = {"x": x}
    if case["epilogue"] == "relu":
        epilogue = Node("Relu", "epilogue", ["c1"], ["p"])
        p = np.maximum(c1, 0)
    elif case["epilogue"] == "residual":
        inputs.append(TensorInfo("r", (None,) + c1.shape[1:]))
        feeds["r"] = rng.normal(size=c1.shape).astype(np.float32)
        epilogue = Node("Add", "epilogue", ["c1", "r"], ["p"])
        p = c1 + feeds["r"]
    else:
        epilogue = Node("Identity", "epilogue", ["c1"], ["p"])
        producer.outputs, consumer.inputs, epilogue = ["p"], ["p"], None
        p = c1
    per_channel = np.moveaxis(p, 1, 0).reshape(channels, -1)
    thresholds = np.quantile(per_channel, [0.3, 0.5, 0.7], axis=1).astype(np.float32)
    if ties:
        thresholds[0] = per_channel[:, 5]
    consumer.params["act_thresholds"] = thresholds
    nodes = [producer] + ([epilogue] if epilogue is not None else []) + [consumer]
    return Graph(inputs, ["y"], nodes), feeds


# ---- fuse_elementwise_chains: chains of per-element ops as one ElementwiseChain ---------------------

def _constant(values):
    return {"constant": np.asarray(values, dtype=np.float32)}


def elementwise_graph(rng, channels=5):
    """conv -> [hard-swish: +3 (ChannelAffine), Clip(0, 6), * x, / 6] -> [ChannelAffine, Relu, Sub
    per-channel constant first, Div scalar, HardSigmoid, x - that, Mul per-channel] -> y."""
    conv = conv_node(rng, "conv", "in", "x", channels)
    nodes = [conv,
             Node("ChannelAffine", "plus3", ["x"], ["t1"], {}, {"scale": np.ones(channels, np.float32),
                                                              "shift": np.full(channels, 3, np.float32)}),
             Node("Clip", "clip", ["t1"], ["t2"], {"min": 0.0, "max": 6.0}),
             Node("Mul", "times_x", ["x", "t2"], ["t3"]),
             Node("Div", "sixth", ["t3"], ["h"], {}, _constant([6.0])),
             Node("ChannelAffine", "bn", ["h"], ["u1"], {}, {"scale": rng.normal(size=channels).astype(np.float32),
                                                          "shift": rng.normal(size=channels).astype(np.float32)}),
             Node("Relu", "relu", ["u1"], ["u2"]),
             Node("Sub", "minus", ["u2"], ["u3"], {"constant_first": 1},
                  _constant(rng.normal(size=(channels, 1, 1)))),
             Node("Div", "scale", ["u3"], ["u4"], {}, _constant([0.7])),
             Node("HardSigmoid", "gate", ["u4"], ["u5"], {"alpha": 0.3, "beta": 0.4}),
             Node("Sub", "residual", ["h", "u5"], ["u6"]),
             Node("Mul", "channels", ["u6"], ["y"], {}, _constant(rng.normal(size=(1, channels, 1, 1))))]
    return Graph([TensorInfo("in", (None, channels, 6, 7))], ["y"], nodes)


def _unfused_float32(graph, feeds):
    """Each stored node's own float32 kernel in graph order (no plan, no fusion)."""
    values = dict(feeds)
    for node in graph.nodes:
        outputs = get_op(node.op).make_kernel(node)([values[name] for name in node.inputs])
        values.update(zip(node.outputs, outputs))
    return values


def test_hard_swish_and_the_ops_after_it_become_two_chains_with_the_same_bits():
    """The hard-swish (its input x read twice) becomes one ElementwiseChain, and the seven ops after
    it a second one reading h (h - HardSigmoid(...) reads h again); a Session's outputs equal the
    stored nodes' own kernels bit for bit, with NaN, infinities, signed zeros and values on the
    clip bounds in the input."""
    from pabnn.engine.fusion import fuse_elementwise_chains
    from pabnn.engine.ops.elementwise_chain import AFFINE, CLAMP, CLIP, DIV, MUL, MUL_X, SUB_FIRST, X_SUB

    rng = np.random.default_rng(3)
    graph = elementwise_graph(rng)
    fused = fuse_elementwise_chains(graph)
    assert [(n.op, n.inputs, n.outputs) for n in fused.nodes] == [
        ("Conv", ["in"], ["x"]), ("ElementwiseChain", ["x"], ["h"]), ("ElementwiseChain", ["h"], ["y"])]
    assert list(fused.nodes[1].config.codes) == [AFFINE, CLIP, MUL_X, DIV]
    assert list(fused.nodes[2].config.codes) == [AFFINE, CLIP, SUB_FIRST, DIV, AFFINE, CLAMP, X_SUB, MUL]
    assert fused.nodes[2].config.sources == ("bn", "relu", "minus", "scale", "gate", "residual", "channels")
    # Conv weights zero: x is the bias plus the input's own special values, through a 1x1 identity-like path.
    x = rng.normal(scale=4, size=(2, 5, 6, 7)).astype(np.float32)
    x[0, 0, 0, :6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, -3.0]
    x[1, 2, 3, :3] = [3.0, -6.0, 6.0]
    identity = Graph([TensorInfo("x", (None, 5, 6, 7))], ["y"], graph.nodes[1:])
    expected = _unfused_float32(identity, {"x": x})["y"]
    (actual,) = Session(identity, amx=False).run(None, {"x": x})
    assert [n.op for n in Session(identity, amx=False).plan_graph().nodes] == ["ElementwiseChain", "ElementwiseChain"]
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))
    (reference,) = get_op("ElementwiseChain").reference(fused.nodes[2], [_unfused_float32(identity, {"x": x})["h"]])
    finite = np.isfinite(expected)
    assert_close(actual[finite], reference[finite], FLOAT32_RTOL, "chain vs its float64 reference")


def test_elementwise_chains_stop_at_shared_kept_and_output_tensors():
    """A tensor inside a chain read twice, named in `keep` or a graph output ends the chain there;
    a lone op, a constant that is neither a scalar nor per-channel, and a 2-D tensor are left alone."""
    from pabnn.engine.fusion import fuse_elementwise_chains

    rng = np.random.default_rng(4)
    graph = elementwise_graph(rng)
    ops = lambda g: [n.op for n in g.nodes]  # noqa: E731
    # x + 3 -> Clip ends at the kept t2; x * t2 starts no chain (a chain starts on a one-tensor op),
    # t3 / 6 alone gives h, which two nodes read.
    assert ops(fuse_elementwise_chains(graph, keep=["t2"])) == ["Conv", "ElementwiseChain", "Mul", "Div",
                                                                 "ElementwiseChain"]
    shared = Graph(graph.inputs, ["y", "u2"], graph.nodes)
    # u2 an output: the chain from h ends there; the next one, from u2, ends before h - u5 (it reads
    # h, not the chain's input u2), and the Mul after that is alone.
    assert [(n.op, n.outputs) for n in fuse_elementwise_chains(shared).nodes][1:] == [
        ("ElementwiseChain", ["h"]), ("ElementwiseChain", ["u2"]), ("ElementwiseChain", ["u5"]), ("Sub", ["u6"]),
        ("Mul", ["y"])]
    lone = Graph(graph.inputs, ["t1"], graph.nodes[:2])
    assert ops(fuse_elementwise_chains(lone)) == ["Conv", "ChannelAffine"]
    per_pixel = Graph(graph.inputs, ["v"], graph.nodes[:1] + [
        Node("Relu", "relu", ["x"], ["r"]), Node("Mul", "m", ["r"], ["v"], {}, _constant(np.ones((5, 6, 7))))])
    assert ops(fuse_elementwise_chains(per_pixel)) == ["Conv", "Relu", "Mul"]
    flat = Graph([TensorInfo("f", (None, 12))], ["v"], [
        Node("Relu", "relu", ["f"], ["r"]), Node("Mul", "m", ["r"], ["v"], {}, _constant([2.0]))])
    assert ops(fuse_elementwise_chains(flat)) == ["Relu", "Mul"]


def test_elementwise_chain_keeps_numpy_signed_zeros_and_nan_at_the_bounds():
    """Relu and Clip give the bound where the value equals it (np.maximum/np.minimum: -0 -> +0),
    HardSigmoid's np.clip keeps the value (-0 stays -0), NaN passes through all, and division by
    zero gives infinities, bit for bit as the stored nodes' kernels: for x = -0, Relu gives +0,
    HardSigmoid(alpha -1, beta -0) -0, 1 / -0 = -inf, Clip(-5, 6) -5 (a wrong sign of zero
    anywhere flips it to 6)."""
    x = np.array([-0.0, 0.0, np.nan, -np.inf, np.inf, 6.0, -1.0, 1e-30], dtype=np.float32)
    x = np.tile(x, (1, 2, 1, 1))
    nodes = [Node("Relu", "relu", ["x"], ["r"]),
             Node("HardSigmoid", "gate", ["r"], ["c"], {"alpha": -1.0, "beta": -0.0}),
             Node("Div", "inverse", ["c"], ["d"], {"constant_first": 1}, _constant([1.0])),
             Node("Clip", "clip", ["d"], ["a"], {"min": -5.0, "max": 6.0}),
             Node("Sub", "minus_x", ["a", "x"], ["y"])]
    graph = Graph([TensorInfo("x", (None, 2, 1, 8))], ["y"], nodes)
    (actual,) = Session(graph, amx=False).run(None, {"x": x})
    assert [n.op for n in Session(graph, amx=False).plan_graph().nodes] == ["ElementwiseChain"]
    expected = _unfused_float32(graph, {"x": x})["y"]
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))
    assert expected[0, 0, 0, 0] == -5.0 and expected[0, 0, 0, 1] == -5.0 and np.isnan(expected[0, 0, 0, 2])


def test_every_two_operand_step_gives_the_same_bits():
    """Sub and Mul by a constant (second and first), then Add, Div and Sub of the value and x in
    both orders, and Mul by x: the chain's steps equal the stored nodes' kernels bit for bit, and
    its float64 reference within float32 rounding."""
    from pabnn.engine.ops.elementwise_chain import (ADD_X, DIV_X, MUL_FIRST, MUL_X, SUB, SUB_X, X_DIV,
                                                    X_SUB)

    rng = np.random.default_rng(7)
    nodes = [Node("Sub", "minus", ["x"], ["a"], {}, _constant(rng.normal(size=(3, 1, 1)))),
             Node("Mul", "times", ["a"], ["b"], {"constant_first": 1}, _constant([1.5])),
             Node("Add", "plus_x", ["x", "b"], ["c"]), Node("Div", "over_x", ["c", "x"], ["d"]),
             Node("Sub", "minus_x", ["d", "x"], ["e"]), Node("Div", "x_over", ["x", "e"], ["f"]),
             Node("Sub", "x_minus", ["x", "f"], ["g"]), Node("Mul", "times_x", ["g", "x"], ["y"])]
    graph = Graph([TensorInfo("x", (None, 3, 4, 9))], ["y"], nodes)
    (plan_node,) = Session(graph, amx=False).plan_graph().nodes
    assert list(plan_node.config.codes) == [SUB, MUL_FIRST, ADD_X, DIV_X, SUB_X, X_DIV, X_SUB, MUL_X]
    x = rng.normal(size=(2, 3, 4, 9)).astype(np.float32)
    x[0, 0, 0, 0] = 0.0  # x / 0 and 0 / 0 in the chain
    (actual,) = Session(graph, amx=False).run(None, {"x": x})
    expected = _unfused_float32(graph, {"x": x})["y"]
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))
    (reference,) = get_op("ElementwiseChain").reference(plan_node, [x])
    finite = np.isfinite(expected)
    assert finite.sum() > 200
    assert_close(actual[finite], reference[finite], FLOAT32_RTOL, "chain vs its float64 reference")


def test_elementwise_chain_threads_give_the_same_bits():
    import numba

    graph = elementwise_graph(np.random.default_rng(5))
    x = np.random.default_rng(6).normal(size=(3, 5, 6, 7)).astype(np.float32)
    identity = Graph([TensorInfo("x", (None, 5, 6, 7))], ["y"], graph.nodes[1:])
    outputs = []
    for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
        outputs.append(Session(identity, threads=threads, amx=False).run(None, {"x": x})[0])
    for output in outputs[1:]:
        np.testing.assert_array_equal(output.view(np.uint32), outputs[0].view(np.uint32))


def conv_pool_graph(rng, conv_attrs, pool_attrs, channels, relu=True, size=(2, 20, 37)):
    """x [B, size[0], H, W] -> Conv(conv_attrs, `channels` outputs) -> (Relu) -> MaxPool(pool_attrs)."""
    kernel = conv_attrs.pop("kernel")
    nodes = [Node("Conv", "conv", ["x"], ["c"], conv_attrs,
                  {"weight": rng.normal(size=(channels, size[0]) + kernel).astype(np.float32) * 0.3,
                   "bias": rng.normal(size=channels).astype(np.float32)})]
    if relu:
        nodes.append(Node("Relu", "relu", ["c"], ["r"]))
    nodes.append(Node("MaxPool", "pool", [nodes[-1].outputs[0]], ["y"], pool_attrs))
    return Graph([TensorInfo("x", (None,) + size)], ["y"], nodes)


# (conv attrs, pool attrs, channels, relu, input [C, H, W]): ResNet's stem and pool; a 3x3 conv with
# a 2x2/2 pool, 12 channels (a block and a half); pools whose pads and strides differ per side and
# windows that overlap the image's edge; an output row narrower than a vector (the two nodes'
# kernels); a pool stride larger than its kernel (conv rows no window reads).
CONV_POOL_CASES = [
    (dict(kernel=(7, 7), strides=[2, 2], pads=[3, 3, 3, 3]),
     dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), 16, True, (3, 40, 66)),
    (dict(kernel=(3, 3), pads=[1, 1, 1, 1]), dict(kernel_shape=[2, 2], strides=[2, 2]), 12, False, (5, 19, 37)),
    (dict(kernel=(3, 3), strides=[1, 2], pads=[0, 1, 2, 1]),
     dict(kernel_shape=[3, 2], strides=[1, 3], pads=[2, 1, 0, 0]), 9, True, (4, 17, 70)),
    (dict(kernel=(3, 3), pads=[1, 1, 1, 1]), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), 8, True,
     (2, 9, 11)),
    (dict(kernel=(5, 3), dilations=[2, 1], pads=[2, 1, 2, 1]), dict(kernel_shape=[2, 2], strides=[3, 3]), 20, True,
     (3, 23, 51)),
]


@pytest.mark.parametrize("case", range(len(CONV_POOL_CASES)))
def test_conv_and_max_pool_fuse_with_the_same_bits(case):
    """A Session fuses Conv (-> Relu) -> MaxPool into one ConvMaxPool whose output equals the two
    stored nodes' own kernels bit for bit (NaN and signed zeros in the input, batch 3), at every
    thread count, and the float64 reference within the float32 tolerance."""
    import numba

    conv_attrs, pool_attrs, channels, relu, size = CONV_POOL_CASES[case]
    rng = np.random.default_rng(20 + case)
    graph = conv_pool_graph(rng, dict(conv_attrs), dict(pool_attrs), channels, relu, size)
    x = rng.normal(size=(3,) + size).astype(np.float32)
    x[1, 0, 2, :4] = [np.nan, -0.0, 0.0, np.inf]
    expected = _unfused_float32(fuse_epilogues(graph), {"x": x})["y"]
    for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
        session = Session(graph, threads=threads, amx=False)
        assert [n.op for n in session.plan_graph().nodes] == ["ConvMaxPool"]
        (actual,) = session.run(None, {"x": x})
        np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))
    (reference,) = get_op("ConvMaxPool").reference(session.plan_graph().nodes[0], [x.astype(np.float64)])
    finite = np.isfinite(reference)
    assert (~finite).any() and finite.sum() > 100
    assert_close(actual[finite], reference[finite], FLOAT32_RTOL, "ConvMaxPool vs its float64 reference")
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(reference))


def test_conv_and_max_pool_stay_apart_when_the_conv_output_is_read_elsewhere():
    """No fusion where the conv output is kept, is a graph output or has a second reader, where the
    conv is 1x1, grouped or has a residual, or where the pool is dilated."""
    from pabnn.engine.fusion import fuse_conv_max_pool

    rng = np.random.default_rng(30)
    stem = dict(kernel=(3, 3), pads=[1, 1, 1, 1])
    pool_attrs = dict(kernel_shape=[2, 2], strides=[2, 2])

    def ops(graph, keep=()):
        return [n.op for n in fuse_conv_max_pool(graph, keep=keep).nodes]

    graph = conv_pool_graph(rng, dict(stem), dict(pool_attrs), 8, relu=False)
    assert ops(graph) == ["ConvMaxPool"]
    assert ops(graph, keep=["c"]) == ["Conv", "MaxPool"]
    assert ops(Graph(graph.inputs, ["y", "c"], graph.nodes)) == ["Conv", "MaxPool"]
    twice = Graph(graph.inputs, ["y", "z"], graph.nodes + [Node("Relu", "other", ["c"], ["z"])])
    assert ops(twice) == ["Conv", "MaxPool", "Relu"]
    assert ops(conv_pool_graph(rng, dict(kernel=(1, 1)), dict(pool_attrs), 8, relu=False)) == ["Conv", "MaxPool"]
    grouped = conv_pool_graph(rng, dict(stem, group=2), dict(pool_attrs), 8, relu=False, size=(4, 9, 20))
    grouped.nodes[0].params["weight"] = grouped.nodes[0].params["weight"][:, :2]
    assert ops(grouped) == ["Conv", "MaxPool"]
    assert ops(conv_pool_graph(rng, dict(stem), dict(pool_attrs, dilations=[2, 2]), 8, relu=False)) == ["Conv",
                                                                                                        "MaxPool"]
    residual = conv_pool_graph(rng, dict(stem), dict(pool_attrs), 20, relu=False)
    residual.nodes[0].inputs.append("x")
    assert ops(residual) == ["Conv", "MaxPool"]


# ConvMaxPool -> PAConv readers: (their pads, padding rule, pad value, group, act_bases, code); each
# case's two readers pack alike, so one set of planes is handed to both.
POOL_HANDOFF_CASES = {
    "thermometer": dict(pads=(1, 1, 1, 1), rule="zero_before_quantizer", pad_value=None, group=1, act_bases=3,
                        coding="thermometer"),
    "binary-pad-1-group2": dict(pads=(2, 0, 0, 2), rule="value_before_quantizer", pad_value=-1.0, group=2, act_bases=3,
                                coding="binary"),
}


@pytest.mark.parametrize("case", sorted(POOL_HANDOFF_CASES))
def test_conv_max_pool_hands_its_readers_the_same_planes(case):
    """A ConvMaxPool whose output goes to PAConvs (and to an Add) writes their planes itself; the
    network's output is the same bits as with the pooled tensor requested too (then it stays
    float32 and a PackPlanes packs it), at every thread count, batch 3, 70 channels (two words,
    not a whole one), input rows split into two work items at two threads."""
    import numba

    from test_act_coding import binary_node

    settings = POOL_HANDOFF_CASES[case]
    rng = np.random.default_rng(40)
    graph = conv_pool_graph(rng, dict(kernel=(3, 3), pads=[1, 1, 1, 1]),
                            dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), 70, True, (3, 20, 37))
    readers = []
    for name, output in (("pa1", "a"), ("pa2", "b")):
        options = dict(pads=settings["pads"], padding_rule=settings["rule"], pad_value=settings["pad_value"],
                       group=settings["group"])
        node = (binary_node(rng, 70, 70, settings["act_bases"], **options) if settings["coding"] == "binary"
                else random_pa_node(rng, 70, 70, act_bases=settings["act_bases"], **options))
        node.name, node.inputs, node.outputs = name, ["y"], [output]
        readers.append(node)
    readers[1].params["act_thresholds"] = readers[0].params["act_thresholds"]  # pack alike
    readers[1].params["act_steps"] = readers[0].params["act_steps"]
    nodes = graph.nodes + readers + [Node("Add", "sum", ["a", "b"], ["s"]), Node("Add", "out", ["s", "y"], ["z"])]
    graph = Graph(graph.inputs, ["z"], nodes)
    x = rng.normal(size=(3, 3, 20, 37)).astype(np.float32)
    outputs = []
    for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
        session = Session(graph, threads=threads, amx=False)
        plan = session.plan_graph()
        fused = [node for node in plan.nodes if node.op == "ConvMaxPool"]
        assert len(fused[0].outputs) == 2 and not any(node.op == "PackPlanes" for node in plan.nodes)
        assert any(node.op == "PackPlanes" for node in session.plan_graph(["z", "y"]).nodes)
        (handed,) = session.run(None, {"x": x})
        packed, _ = session.run(["z", "y"], {"x": x})
        np.testing.assert_array_equal(handed.view(np.uint32), packed.view(np.uint32))
        outputs.append(handed)
    for output in outputs[1:]:
        np.testing.assert_array_equal(output.view(np.uint32), outputs[0].view(np.uint32))
    # The plan node's own planes against its reference's.
    inputs = [x]
    node = fused[0]
    y, planes = get_op("ConvMaxPool").make_kernel(node)(inputs)
    reference_y, reference_planes = get_op("ConvMaxPool").reference(node, [x.astype(np.float64)])
    assert_close(y, reference_y, FLOAT32_RTOL, "ConvMaxPool y")
    np.testing.assert_array_equal(planes, node.config.planes.pack(y))
    differ = planes != reference_planes
    assert differ.mean() < 1e-3  # float32 rounding may flip a bit at a threshold
