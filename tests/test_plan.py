"""engine/plan.py: PAConvs lowered into PackPlanes and BinaryConv steps, bit-planes handed from
binary layer to binary layer; every planned output equals the plan that packs each float output,
bit for bit, and the handed-off planes equal packing the float32 output (the twin). Sessions here
use the AND-popcount kernels only (amx=False): the AMX plan is tests/test_amx_conv.py's."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from test_fusion import HANDOFF_CASES, handoff_chain, residual_block
from test_pa_conv import random_pa_node
from tolerances import PA_COMBINE_RTOL, assert_close

from pabnn.engine import Session, run_reference
from pabnn.engine.bits import pack_activations_reference, unpack_activations
from pabnn.engine.errors import GraphError
from pabnn.engine.fusion import fuse_epilogues
from pabnn.engine.graph import Graph, Node, PlanNode, TensorInfo
from pabnn.engine.ops import get_op
from pabnn.engine.ops._binary_conv_kernel import PlanesWriter
from pabnn.engine.ops.pa_conv import prepare_weights
from pabnn.engine.ops.registry import check_stored_node
from pabnn.engine.plan import lower, lower_binary_layers


def planned_nodes(graph):
    return {node.name: node for node in graph.nodes}


def run_plan_node(node, values):
    outputs = get_op(node.op).make_kernel(node)([values[name] for name in node.inputs])
    values.update(zip(node.outputs, outputs))
    return outputs


# (activation code, channels, pads of the two 3x3 readers: the planes' pads)
BLOCK_CODINGS = {"thermometer-70": ("thermometer", 70, (1, 1, 1, 1)),
                 "binary-192-asymmetric": ("binary", 192, (0, 2, 1, 0)),
                 # 16-channel blocks: the epilogue (float32 output, planes) in the micro-kernel's last call
                 "thermometer-128-asymmetric": ("thermometer", 128, (0, 2, 1, 0))}


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


def test_each_paconv_becomes_packing_and_a_binary_convolution_with_typed_configs():
    graph = residual_block(np.random.default_rng(0), "PAConv")
    plan = lower(graph)
    assert [(node.op, node.name, node.inputs, node.outputs) for node in plan.nodes] == [
        ("PackPlanes", "conv1.pack", ["x"], ["x.planes"]),
        ("BinaryConv", "conv1", ["x.planes"], ["r1.planes"]),  # relu fused; hands conv2 its planes
        ("BinaryConv", "conv2", ["r1.planes", "x"], ["y"])]  # residual x fused
    assert all(isinstance(node, PlanNode) and not node.attrs and not node.params for node in plan.nodes)
    assert plan.nodes[1].config.output_layout is not None and not plan.nodes[1].config.writes_float
    assert plan.nodes[2].config.layer.attrs["activation"] == "relu"
    assert [node.source for node in plan.nodes] == ["conv1", "conv1", "conv2"]
    plan.infer_shapes()  # validated as a graph


@pytest.mark.parametrize("case", sorted(HANDOFF_CASES))
def test_handed_off_planes_give_the_same_outputs_as_packing_the_float_output(case):
    rng = np.random.default_rng(3)
    graph, feeds = handoff_chain(rng, HANDOFF_CASES[case])
    session = Session(graph, amx=False)
    planned = planned_nodes(session.plan_graph())
    assert planned["producer"].config.output_layout is not None and "consumer.pack" not in planned
    assert planned["consumer"].inputs[0] == planned["producer"].outputs[-1]
    # Asking for the intermediate tensor keeps it float32: the plan without the hand-off.
    kept = planned_nodes(session.plan_graph(["y", "p"]))
    assert kept["producer"].config.output_layout is None and "consumer.pack" in kept
    (handed_off,) = session.run(["y"], feeds)
    packed, _ = session.run(["y", "p"], feeds)
    np.testing.assert_array_equal(handed_off, packed)
    (one_thread,) = Session(graph, threads=1, amx=False).run(["y"], feeds)
    np.testing.assert_array_equal(one_thread, handed_off)
    untied, feeds = handoff_chain(np.random.default_rng(3), HANDOFF_CASES[case], ties=False)
    (handed_off,) = Session(untied, amx=False).run(["y"], feeds)
    assert_close(handed_off, run_reference(untied, feeds)["y"], PA_COMBINE_RTOL, "handed-off chain vs reference")


@pytest.mark.parametrize("case", sorted(HANDOFF_CASES))
def test_producer_writes_exactly_the_planes_the_reader_would_pack(case):
    """The producer's planes vs `pack_activations_reference` of its float32 output (the twin)."""
    rng = np.random.default_rng(4)
    spec = HANDOFF_CASES[case]
    graph, feeds = handoff_chain(rng, spec)
    plain = fuse_epilogues(graph)
    handed = planned_nodes(lower_binary_layers(plain))
    values = dict(feeds)
    run_plan_node(handed["producer.pack"], values)
    (planes,) = run_plan_node(handed["producer"], values)
    (float_output,) = get_op("PAConv").make_kernel(plain.nodes[0])([feeds[name] for name in plain.nodes[0].inputs])
    config = handed["producer"].config
    writer = PlanesWriter(config.output_layout, prepare_weights(config.layer))
    if case.endswith("in-registers"):  # planes only, no residual: the micro-kernel writes the bits itself
        assert writer.in_registers and not config.writes_float
    consumer = plain.nodes[1]
    pad_value = 0.0 if spec["pad_value"] is None else spec["pad_value"]
    expected = pack_activations_reference(float_output, consumer.params["act_thresholds"], spec["pads"], pad_value,
                                          spec["group"])
    assert planes.dtype == np.uint64
    np.testing.assert_array_equal(planes, expected)
    # Not a trivial pattern: every plane has both bit values inside.
    top, left = spec["pads"][:2]
    inside = unpack_activations(planes[:, :, top:top + float_output.shape[2], left:left + float_output.shape[3]],
                                spec["channels"], spec["group"])
    assert all(0 < inside[j].mean() < 1 for j in range(planes.shape[0]))


def test_planes_of_a_tensor_with_other_readers_come_with_its_float32_output():
    rng = np.random.default_rng(5)
    graph, _ = handoff_chain(rng, HANDOFF_CASES["relu"])
    # A second reader of the tensor (a float one) keeps it float32, and the consumer reads planes.
    shared = Graph(graph.inputs, ["y", "z"], graph.nodes + [Node("Relu", "other", ["p"], ["z"])])
    planned = planned_nodes(lower(shared))
    assert planned["producer"].outputs == ["p", "p.planes"] and planned["producer"].config.writes_float
    assert planned["consumer"].inputs == ["p.planes"] and "consumer.pack" not in planned
    assert planned["other"].inputs == ["p"]
    # A graph output is never handed off.
    assert all(node.op != "BinaryConv" or node.config.output_layout is None for node in lower(graph, keep=["p"]).nodes)


@pytest.mark.parametrize("case", sorted(BLOCK_CODINGS))
def test_block_output_hands_planes_to_its_binary_readers_and_keeps_float32_for_the_rest(case):
    coding, channels, pads = BLOCK_CODINGS[case]
    graph, feeds = block_output_graph(np.random.default_rng(6), coding, channels, pads)
    session = Session(graph, amx=False)
    planned = planned_nodes(session.plan_graph())
    assert planned["producer"].outputs == ["p", "p.planes"]
    assert planned["producer"].config.output_layout.coding == coding
    # The shortcut packs x with thresholds of its own (x.planes or x.planes_2) and adds p as its residual.
    assert planned["shortcut"].inputs[1] == "p"
    packs = {node.outputs[0]: node for node in planned.values() if node.op == "PackPlanes"}
    assert packs[planned["shortcut"].inputs[0]].inputs == ["x"]
    for reader in ("reader1", "reader2", "reader3"):
        assert planned[reader].inputs == ["p.planes"] and f"{reader}.pack" not in planned
    # The 1x1 reader reads the 3x3 readers' planes from inside their padding.
    assert planned["reader3"].config.planes_pads == tuple(pads)
    assert planned["reader2"].config.planes_pads == tuple(pads)
    # Its own thresholds: the dilated reader packs the float32 tensor itself.
    assert planned["reader4.pack"].inputs == ["p"] and planned["reader4"].inputs == planned["reader4.pack"].outputs
    handed_off = session.run(OUTPUTS, feeds)
    # Asking for p keeps it a plain float32 tensor: the plan without the hand-off, bit for bit.
    assert planned_nodes(session.plan_graph(OUTPUTS + ["p"]))["producer"].config.output_layout is None
    unfused = session.run(OUTPUTS + ["p"], feeds)
    for name, fast, plain in zip(OUTPUTS, handed_off, unfused):
        np.testing.assert_array_equal(fast, plain, err_msg=name)
    for fast, one_thread in zip(handed_off, Session(graph, threads=1, amx=False).run(OUTPUTS, feeds)):
        np.testing.assert_array_equal(fast, one_thread)
    # The producer's two outputs: the float32 of the plain producer, and the planes its twin packs from it.
    values = dict(feeds)
    run_plan_node(planned["producer.pack"], values)
    float_output, planes = run_plan_node(planned["producer"], values)
    np.testing.assert_array_equal(float_output, unfused[-1])
    reader = planned["reader1"].config.layer
    expected = pack_activations_reference(float_output, reader.params["act_thresholds"], pads, coding=coding)
    np.testing.assert_array_equal(planes, expected)
    top, left = pads[:2]
    inside = unpack_activations(planes[:, :, top:top + float_output.shape[2], left:left + float_output.shape[3]],
                                channels)
    assert all(0 < inside[j].mean() < 1 for j in range(planes.shape[0]))


def test_plan_only_ops_are_refused_in_a_stored_graph():
    plan = lower(residual_block(np.random.default_rng(0), "PAConv"))
    for node in plan.nodes:
        stored = Node(node.op, node.name, node.inputs, node.outputs)
        with pytest.raises(GraphError, match=f"{node.name!r}: op '{node.op}' exists only in a Session's plan"):
            check_stored_node(stored)


_GENERIC_CPU_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np
from test_plan import generic_cpu_outputs
np.savez(sys.argv[1], *generic_cpu_outputs())
"""


def generic_cpu_outputs():
    """The outputs the generic-CPU test compares: ResNet-style block outputs handing off binary-coded
    planes (the general epilogue) and thermometer planes of 16-channel blocks (the epilogues in the
    micro-kernel), and a chain whose planes-only output the micro-kernel writes."""
    outputs = []
    for coding, channels, pads in (("binary", 192, (0, 2, 1, 0)), ("thermometer", 128, (0, 2, 1, 0))):
        graph, feeds = block_output_graph(np.random.default_rng(6), coding, channels, pads)
        outputs += Session(graph, amx=False).run(OUTPUTS, feeds)
    graph, feeds = handoff_chain(np.random.default_rng(3), HANDOFF_CASES["relu-in-registers"])
    return outputs + Session(graph, amx=False).run(["y"], feeds)


def test_handed_off_planes_give_the_same_bits_on_a_generic_cpu(tmp_path):
    """The plan's packing, binary convolutions and plane hand-offs compiled for a CPU without
    AVX-512 (NUMBA_CPU_NAME=generic) give the same outputs as on this machine."""
    tests = str(pathlib.Path(__file__).parent)
    environment = dict(os.environ, NUMBA_CPU_NAME="generic", PABNN_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", _GENERIC_CPU_SCRIPT, str(tmp_path / "generic.npz"), tests],
                   env=environment, check=True, timeout=600)
    generic = np.load(tmp_path / "generic.npz")
    here = generic_cpu_outputs()
    assert len(generic.files) == len(here) == 2 * len(OUTPUTS) + 1
    for index, output in enumerate(here):
        np.testing.assert_array_equal(generic[f"arr_{index}"], output, err_msg=f"output {index}")


def test_later_runs_repeat_the_steps_calls_and_give_what_a_new_session_gives(monkeypatch):
    """ConvMaxPool and BinaryConv keep their planes, and BinaryConv its last call, in the Session's
    state for the step (registry.Op.keeps_state): a later run repeats each BinaryConv's call as it
    was (the same argument tuple), and gives, on new inputs (a new residual array too), on an input
    that is not C-contiguous (copied) and at another numba thread count, what a new Session gives,
    bit for bit."""
    import numba
    from test_fusion import conv_pool_graph

    from pabnn.engine.ops import pa_conv

    rng = np.random.default_rng(8)
    pooled = conv_pool_graph(rng, dict(kernel=(7, 7), strides=[2, 2], pads=[3, 3, 3, 3]),
                             dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), 64, True, (3, 40, 66))
    first = random_pa_node(rng, 64, 64, act_bases=2)
    first.name, first.inputs, first.outputs = "first", ["y"], ["a"]
    first.attrs["activation"] = "relu"
    second = random_pa_node(rng, 64, 64, act_bases=2)
    second.name, second.inputs, second.outputs = "second", ["a", "shortcut"], ["z"]  # a fed residual
    # z in a planned buffer (a returned output is written into an array of its own, without state)
    graph = Graph(pooled.inputs + [TensorInfo("shortcut", (None, 64, 10, 17))], ["w"],
                  pooled.nodes + [first, second, Node("GlobalAveragePool", "mean", ["z"], ["w"])])
    calls = []
    kernel = pa_conv.binary_conv_kernel
    monkeypatch.setattr(pa_conv, "binary_conv_kernel", lambda *arguments: (calls.append(arguments),
                                                                           kernel(*arguments))[1])
    session = Session(graph, amx=False)
    assert [node.op for node in session.plan_graph().nodes] == ["ConvMaxPool", "BinaryConv", "BinaryConv",
                                                                 "GlobalAveragePool"]
    inputs = [rng.normal(size=(2, 3, 40, 66)).astype(np.float32) for _ in range(3)]
    residuals = [rng.normal(size=(2, 64, 10, 17)).astype(np.float32) for _ in range(3)]
    previous = numba.get_num_threads()
    try:
        for x, r, threads in ((inputs[0], residuals[0], 1), (inputs[1], residuals[0], 1),
                              (np.asfortranarray(inputs[2]), residuals[1], 1), (inputs[2], residuals[2], 1),
                              (inputs[0], residuals[0], numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            calls.clear()
            (w,) = session.run(None, {"x": x, "shortcut": r})
            (expected,) = Session(graph, amx=False).run(None, {"x": x, "shortcut": r})
            np.testing.assert_array_equal(w.view(np.uint32), expected.view(np.uint32))
            if x is inputs[1]:  # the run after a run like it repeated both calls
                assert [id(arguments) for arguments in calls[:2]] == last_calls
            last_calls = [id(arguments) for arguments in calls[:2]]
    finally:
        numba.set_num_threads(previous)
