"""engine/session.py: the run schedule (engine/graph.py: schedule) and the BLAS limit around runs
(the plans: test_plan.py, buffers: test_memory.py, processes and threads: test_processes.py)."""
import numpy as np
import pytest
from threadpoolctl import ThreadpoolController

from pabnn.engine.graph import Graph, Node, TensorInfo, schedule
from pabnn.engine.session import Session, _BlasThreads


def _chain():
    """x -> Relu a -> Relu b -> Add(a, b) c: `a` is read last by the Add."""
    nodes = [Node("Relu", "first", ["x"], ["a"]), Node("Relu", "second", ["a"], ["b"]),
             Node("Add", "sum", ["a", "b"], ["c"])]
    return Graph([TensorInfo("x", (None, 3))], ["c"], nodes)


def test_steps_drop_each_tensor_after_its_last_reader_and_keep_outputs():
    graph = _chain()
    assert schedule(graph, keep=()) == [(("x",), ("a",), ("x",)), (("a",), ("b",), ()), (("a", "b"), ("c",), ("a", "b"))]
    kept = schedule(graph, keep=("a",))
    assert [dropped for _, _, dropped in kept] == [("x",), (), ("b",)]


def test_run_returns_kept_intermediates():
    session = Session(_chain())
    x = np.array([[-1.0, 0.5, 2.0]], dtype=np.float32)
    c, a = session.run(["c", "a"], {"x": x})
    np.testing.assert_array_equal(a, np.maximum(x, 0))
    np.testing.assert_array_equal(c, 2 * np.maximum(x, 0))


def test_blas_limit_holds_while_any_run_is_on_and_restores_after_the_last():
    """Overlapping runs keep the limit until the last one ends, which restores the count from
    before the first. (Nested in one thread: with OpenBLAS 0.3.31, a count set from another Python
    thread does not show in get_num_threads once the main thread has set one.)"""
    libraries = ThreadpoolController().select(user_api="blas").lib_controllers
    if not libraries:
        pytest.skip("numpy's BLAS is not one that threadpoolctl controls")
    with ThreadpoolController().limit(limits=2, user_api="blas"):
        original = [library.get_num_threads() for library in libraries]
        seen = []
        with _BlasThreads.limit(1):
            with _BlasThreads.limit(1):
                seen.append([library.get_num_threads() for library in libraries])
            seen.append([library.get_num_threads() for library in libraries])
        assert seen == [[1] * len(libraries)] * 2
        assert [library.get_num_threads() for library in libraries] == original
