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
    session = Session(graph)
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
