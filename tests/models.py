"""Helpers shared by the model-level tests.

`assert_engine_matches_reference_per_op` is the whole-model form of "every kernel equals its
reference": it checks each node of a graph on the engine's own intermediate values, so an error
in one op is reported at that op instead of being blurred (or amplified) by the ops after it.
"""
import numpy as np
from tolerances import FLOAT32_RTOL, PA_COMBINE_RTOL, assert_close

from pabnn.engine.graph import run_graph
from pabnn.engine.ops import get_op

# Ops whose kernel is popcounts plus a float64 combine rounded once to float32.
PA_OPS = ("PAConv", "PALinear")


def assert_engine_matches_reference_per_op(graph, feeds):
    """For every node, fast kernel(inputs) == reference(inputs) on the same inputs.

    The inputs of each node are the float32 values the engine itself computed for them (the
    whole graph is run once with the fast kernels, keeping every tensor). Each node's kernel is
    then called again on those inputs, and its reference is called on the same values widened
    to float64 (exactly). PAConv/PALinear must agree within PA_COMBINE_RTOL, every other op
    within FLOAT32_RTOL. The second kernel call must also reproduce the first run bit for bit
    (kernels are deterministic and do not write into their inputs).

    graph: a pabnn Graph; feeds: {input name: array [batch, ...]}.
    Returns {tensor name: float32 array}, every tensor the engine computed.
    """
    graph.infer_shapes()
    feeds = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in feeds.items()}
    values = run_graph(graph, feeds, lambda node: get_op(node.op, node.name).make_kernel(node), keep="all")
    for node in graph.nodes:
        op = get_op(node.op, node.name)
        inputs = [values[name] for name in node.inputs]
        fast = op.make_kernel(node)(inputs)
        reference = op.reference(node, [value.astype(np.float64) for value in inputs])
        rtol = PA_COMBINE_RTOL if node.op in PA_OPS else FLOAT32_RTOL
        for name, actual, expected in zip(node.outputs, fast, reference):
            where = f"node {node.name!r} ({node.op}) output {name!r}"
            assert actual.dtype == np.float32, f"{where}: kernel returned {actual.dtype}"
            np.testing.assert_array_equal(actual, values[name], err_msg=f"{where}: kernel is not repeatable")
            assert_close(actual, expected, rtol, where)
    return values
