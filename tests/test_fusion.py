"""fuse_epilogues and the fused epilogue of Conv/PAConv, against the unfused reference;
hand_off_planes, against packing the float output."""
import numpy as np
import pytest
from test_pa_conv import random_pa_node
from tolerances import FLOAT32_RTOL, PA_COMBINE_RTOL, assert_close

from pabnn.engine import Session, run_reference
from pabnn.engine.bits import pack_activations_reference, unpack_bits_last_axis
from pabnn.engine.fusion import fuse_epilogues, hand_off_planes
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


@pytest.mark.parametrize("case", sorted(HANDOFF_CASES))
def test_handed_off_planes_give_the_same_outputs_as_packing_the_float_output(case):
    rng = np.random.default_rng(3)
    graph, feeds = handoff_chain(rng, HANDOFF_CASES[case])
    session = Session(graph)
    planned = {node.name: node for node in session.plan_graph().nodes}
    assert "output_planes" in planned["producer"].attrs and planned["consumer"].attrs["input_planes"]
    # Asking for the intermediate tensor keeps it float32: the plan without the hand-off.
    assert not any("output_planes" in node.attrs for node in session.plan_graph(["y", "p"]).nodes)
    (handed_off,) = session.run(["y"], feeds)
    packed, _ = session.run(["y", "p"], feeds)
    np.testing.assert_array_equal(handed_off, packed)
    (one_thread,) = Session(graph, threads=1).run(["y"], feeds)
    np.testing.assert_array_equal(one_thread, handed_off)
    untied, feeds = handoff_chain(np.random.default_rng(3), HANDOFF_CASES[case], ties=False)
    (handed_off,) = Session(untied).run(["y"], feeds)
    assert_close(handed_off, run_reference(untied, feeds)["y"], PA_COMBINE_RTOL, "handed-off chain vs reference")


@pytest.mark.parametrize("case", sorted(HANDOFF_CASES))
def test_producer_writes_exactly_the_planes_the_reader_would_pack(case):
    """The producer's planes vs `pack_activations_reference` of its float32 output (the twin)."""
    rng = np.random.default_rng(4)
    spec = HANDOFF_CASES[case]
    graph, feeds = handoff_chain(rng, spec)
    plain = fuse_epilogues(graph)
    handed = hand_off_planes(plain)
    producer = {node.name: node for node in handed.nodes}["producer"]
    inputs = [feeds[name] for name in producer.inputs]
    (planes,) = get_op("PAConv").make_kernel(producer)(inputs)
    (float_output,) = get_op("PAConv").make_kernel(plain.nodes[0])(inputs)
    consumer = plain.nodes[1]
    pad_value = 0.0 if spec["pad_value"] is None else spec["pad_value"]
    expected = pack_activations_reference(float_output, consumer.params["act_thresholds"], spec["pads"], pad_value,
                                          spec["group"])
    assert planes.dtype == np.uint64
    np.testing.assert_array_equal(planes, expected)
    # Not a trivial pattern: every plane has both bit values inside.
    top, left = spec["pads"][:2]
    inside = unpack_bits_last_axis(planes[:, :, top:top + float_output.shape[2], left:left + float_output.shape[3]],
                                   spec["channels"] // spec["group"])
    assert all(0 < inside[j].mean() < 1 for j in range(planes.shape[0]))


def test_planes_of_a_tensor_with_other_readers_come_with_its_float32_output():
    rng = np.random.default_rng(5)
    graph, _ = handoff_chain(rng, HANDOFF_CASES["relu"])
    # A second reader of the tensor (a float one) keeps it float32, and the consumer reads planes.
    shared = Graph(graph.inputs, ["y", "z"], graph.nodes + [Node("Relu", "other", ["p"], ["z"])])
    planned = {node.name: node for node in hand_off_planes(fuse_epilogues(shared)).nodes}
    assert planned["producer"].outputs == ["p", "p.planes"] and "output_planes" in planned["producer"].attrs
    assert planned["consumer"].inputs == ["p.planes"] and planned["consumer"].attrs["input_planes"]
    assert planned["other"].inputs == ["p"]
    # A graph output is never handed off.
    assert not any("output_planes" in node.attrs
                   for node in hand_off_planes(fuse_epilogues(graph), keep=["p"]).nodes)


# (activation code, channels, pads of the two 3x3 readers: the planes' pads)
BLOCK_CODINGS = {"thermometer-70": ("thermometer", 70, (1, 1, 1, 1)),
                 "binary-192-asymmetric": ("binary", 192, (0, 2, 1, 0))}


def block_output_graph(rng, coding, channels, pads):
    """x -> producer (ReLU) -> p, read as in a ResNet: by two 3x3 PAConvs with the same thresholds,
    a 1x1 stride-2 PAConv without padding (it reads their planes from inside their padding), a
    dilated 3x3 PAConv that pads 2 with thresholds of its own (it packs its own planes), and as
    the residual of a PAConv on x. Outputs y0 .. y4."""
    producer = random_pa_node(rng, channels, 20, act_bases=2)
    producer.name, producer.inputs, producer.outputs = "producer", ["x"], ["c"]
    producer.attrs["activation"] = "relu"
    producer.outputs = ["p"]
    readers = [random_pa_node(rng, channels, channels, act_bases=3, pads=pads),
               random_pa_node(rng, channels, channels, act_bases=3, pads=pads),
               random_pa_node(rng, channels, channels, kernel=(1, 1), strides=(2, 2), pads=(0, 0, 0, 0),
                              act_bases=3),
               random_pa_node(rng, channels, channels, pads=(2, 2, 2, 2), dilations=(2, 2), act_bases=3)]
    x = rng.normal(size=(2, 20, 9, 7)).astype(np.float32)
    (p,) = get_op("PAConv").make_kernel(producer)([x])
    per_channel = np.moveaxis(p, 1, 0).reshape(channels, -1)
    thresholds = np.quantile(per_channel, [0.3, 0.5, 0.7], axis=1).astype(np.float32)
    thresholds[0] = per_channel[:, 5]  # ties: a value the float32 output takes
    for index, reader in enumerate(readers):
        reader.name, reader.inputs, reader.outputs = f"reader{index + 1}", ["p"], [f"c{index + 1}"]
        reader.params["act_thresholds"] = thresholds if index < 3 else thresholds + np.float32(0.125)
        if coding == "binary":
            reader.attrs["act_coding"] = "binary"
            reader.params["act_steps"] = np.array([0.25, 0.5], np.float32)
    shortcut = random_pa_node(rng, channels, 20, act_bases=2)
    shortcut.name, shortcut.inputs, shortcut.outputs = "shortcut", ["x"], ["c0"]
    readers[1].outputs = ["y2"]
    # The 1x1 reader first: the planes are still those of the 3x3 readers, which pad more.
    nodes = [producer, shortcut, Node("Add", "residual", ["c0", "p"], ["y0"]), readers[2],
             Node("Relu", "relu3", ["c3"], ["y3"]), readers[0], Node("Relu", "relu1", ["c1"], ["y1"]), readers[1],
             readers[3], Node("Relu", "relu4", ["c4"], ["y4"])]
    return Graph([TensorInfo("x", (None, 20, 9, 7))], OUTPUTS, nodes), {"x": x}


OUTPUTS = ["y0", "y1", "y2", "y3", "y4"]


@pytest.mark.parametrize("case", sorted(BLOCK_CODINGS))
def test_block_output_hands_planes_to_its_binary_readers_and_keeps_float32_for_the_rest(case):
    coding, channels, pads = BLOCK_CODINGS[case]
    graph, feeds = block_output_graph(np.random.default_rng(6), coding, channels, pads)
    session = Session(graph)
    planned = {node.name: node for node in session.plan_graph().nodes}
    assert planned["producer"].outputs == ["p", "p.planes"]
    assert planned["producer"].attrs["output_planes"]["coding"] == coding
    assert planned["shortcut"].inputs == ["x", "p"]
    assert planned["reader1"].inputs == ["p.planes"] and planned["reader1"].attrs["input_planes"]
    assert planned["reader2"].inputs == ["p.planes"] and planned["reader2"].attrs["input_planes"]
    assert planned["reader3"].inputs == ["p.planes"] and planned["reader3"].attrs["input_planes_pads"] == list(pads)
    assert "input_planes_pads" not in planned["reader2"].attrs
    assert planned["reader4"].inputs == ["p"] and "input_planes" not in planned["reader4"].attrs
    handed_off = session.run(OUTPUTS, feeds)
    # Asking for p keeps it a plain float32 tensor: the plan without the hand-off, bit for bit.
    assert not any("output_planes" in node.attrs for node in session.plan_graph(OUTPUTS + ["p"]).nodes)
    unfused = session.run(OUTPUTS + ["p"], feeds)
    for name, fast, plain in zip(OUTPUTS, handed_off, unfused):
        np.testing.assert_array_equal(fast, plain, err_msg=name)
    for fast, one_thread in zip(handed_off, Session(graph, threads=1).run(OUTPUTS, feeds)):
        np.testing.assert_array_equal(fast, one_thread)
    # The producer's two outputs: the float32 of the plain producer, and the planes its twin packs from it.
    producer = planned["producer"]
    float_output, planes = get_op("PAConv").make_kernel(producer)([feeds["x"]])
    np.testing.assert_array_equal(float_output, unfused[-1])
    expected = pack_activations_reference(float_output, planned["reader1"].params["act_thresholds"], pads,
                                          coding=coding)
    np.testing.assert_array_equal(planes, expected)
    top, left = pads[:2]
    inside = unpack_bits_last_axis(planes[:, :, top:top + float_output.shape[2], left:left + float_output.shape[3]],
                                   channels)
    assert all(0 < inside[j].mean() < 1 for j in range(planes.shape[0]))
