"""The liveness-based buffer plan and its use by Session."""
import numpy as np
from test_fusion import conv_node

from pabnn.engine import Session
from pabnn.engine.graph import Graph, Node, TensorInfo, run_graph
from pabnn.engine.memory import plan_buffers
from pabnn.engine.ops import _attrs, get_op


def chain(rng, channels=6):
    """conv -> conv -> maxpool -> conv -> flatten -> gemm, every conv output read once."""
    nodes = [conv_node(rng, "c1", "x", "a", channels), conv_node(rng, "c2", "a", "b", channels),
             Node("MaxPool", "pool", ["b"], ["p"], {"kernel_shape": [2, 2], "strides": [2, 2]}),
             conv_node(rng, "c3", "p", "c", channels), Node("Flatten", "flat", ["c"], ["f"]),
             Node("Gemm", "fc", ["f"], ["y"], {}, {"weight": rng.normal(size=(3, channels * 4 * 4)).astype(np.float32),
                                                     "bias": np.zeros(3, np.float32)})]
    return Graph([TensorInfo("x", (None, channels, 8, 8))], ["y"], nodes)


def test_buffers_are_reused_after_the_last_read_and_views_keep_them_alive():
    graph = chain(np.random.default_rng(0))
    plan = plan_buffers(graph, graph.infer_shapes())
    slot = plan.slot_of
    assert set(slot) == {"a", "b", "p", "c"}  # conv/pool outputs; graph inputs/outputs are not planned
    assert slot["a"] != slot["b"]  # a is still being read while b is written
    assert slot["p"] == slot["a"]  # a is dead once c2 ran
    assert slot["c"] not in (slot["p"],)  # p is read by c3 while c is written
    # c is read through the Flatten view f by the Gemm: nothing else may take c's slot before.
    assert len(plan.slot_elements) == 2
    assert plan.bytes_per_sample() == 4 * 2 * 6 * 8 * 8


def test_requested_tensors_are_never_planned_and_views_returned_are_copies():
    rng = np.random.default_rng(1)
    graph = chain(rng)
    shapes = graph.infer_shapes()
    assert "b" not in plan_buffers(graph, shapes, keep=["b"]).slot_of
    assert "c" in plan_buffers(graph, shapes, keep=["f"]).slot_of  # f is a view of c
    session = Session(graph)
    x1, x2 = (rng.normal(size=(1, 6, 8, 8)).astype(np.float32) for _ in range(2))
    (first,) = session.run(["f"], {"x": x1})
    kept = first.copy()
    session.run(["f"], {"x": x2})
    np.testing.assert_array_equal(first, kept)  # the view of c's buffer was copied out


def test_session_with_buffers_equals_plain_kernels_bitwise_across_batches():
    rng = np.random.default_rng(2)
    graph = chain(rng)
    session = Session(graph)
    kernels = {node.name: get_op(node.op).make_kernel(node) for node in graph.nodes}
    results = {}
    for batch in (2, 3, 2):
        x = rng.normal(size=(batch, 6, 8, 8)).astype(np.float32)
        (y,) = session.run(None, {"x": x})
        expected = run_graph(graph, {"x": x}, lambda node: kernels[node.name])["y"]
        np.testing.assert_array_equal(y, expected)
        results[batch] = (x, y.copy(), y)
    # Returned arrays are the caller's: later runs never write into them.
    for x, copy, returned in results.values():
        np.testing.assert_array_equal(returned, copy)


def test_planned_memory_is_smaller_than_all_intermediates():
    graph = chain(np.random.default_rng(3))
    shapes = graph.infer_shapes()
    everything = 4 * sum(_attrs.sample_elements(shapes[name]) for name in ("a", "b", "p", "c"))
    assert Session(graph).planned_bytes_per_sample() < everything


def test_output_arrays_are_reused_only_once_the_caller_dropped_them():
    """A requested conv output is written into the session's array of the previous run when
    nothing refers to that array any more (no allocation per run), else into a new one."""
    rng = np.random.default_rng(4)
    graph = Graph([TensorInfo("x", (None, 6, 8, 8))], ["a"], [conv_node(rng, "c1", "x", "a", 6)])
    session = Session(graph)
    x1, x2 = (rng.normal(size=(1, 6, 8, 8)).astype(np.float32) for _ in range(2))
    (expected_2,) = session.run(None, {"x": x2})
    expected_2 = expected_2.copy()

    def address(array):
        return array.__array_interface__["data"][0]

    (held,) = session.run(None, {"x": x1})
    kept = held.copy()
    view = held[0, 1:]
    (other,) = session.run(None, {"x": x2})  # `held` is still referred to: a new array
    assert address(other) != address(held)
    np.testing.assert_array_equal(held, kept)
    del held
    (again,) = session.run(None, {"x": x2})  # `view` keeps the first array alive
    np.testing.assert_array_equal(view, kept[0, 1:])
    np.testing.assert_array_equal(again, expected_2)
    dropped = address(again)
    del again
    (reused,) = session.run(None, {"x": x2})
    assert address(reused) == dropped
    np.testing.assert_array_equal(reused, expected_2)
