"""Sessions in child processes: fork, spawn and forkserver, a Session made in the parent included.

The parent first runs the model with 2 threads, so numba's threading layer and the float Conv's
thread pool are started before the child is made (the case that hung: a forked child inherited
them without their threads). Each child runs with a time limit, and its outputs must equal the
parent's bit for bit.
"""
import os
import pickle
import platform
import sys

import numba
import numpy as np
import pytest
from child_processes import run_in_child
from small_models import INPUT_SHAPE, small_pa_graph

from pabnn.engine import Session, load, save

THREADS = min(2, numba.config.NUMBA_NUM_THREADS)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A PA model (PAConv, PALinear, float Conv and Gemm) saved, loaded and run in this process."""
    path = tmp_path_factory.mktemp("processes") / "small.pab"
    save(small_pa_graph(), path)
    session = load(path, threads=THREADS)
    x = np.random.default_rng(0).standard_normal((4, *INPUT_SHAPE)).astype(np.float32)
    (expected,) = session.run(None, {"x": x})
    assert numba.threading_layer() in ("tbb", "workqueue"), "a threading layer that is not fork-safe was chosen"
    return {"path": path, "session": session, "x": x, "expected": expected}


def _run_inherited(queue, x):
    (y,) = _INHERITED.run(None, {"x": x})
    queue.put(y)


def _run_loaded(queue, path, x):
    (y,) = load(path, threads=THREADS).run(None, {"x": x})
    queue.put(y)


def _run_sent(queue, session, x):
    (y,) = session.run(None, {"x": x})
    queue.put(y)


_INHERITED = None  # the parent's Session, which a forked child inherits as a module global


def test_forked_child_uses_the_session_made_in_the_parent(parent, monkeypatch):
    monkeypatch.setitem(globals(), "_INHERITED", parent["session"])
    y = run_in_child("fork", _run_inherited, parent["x"])
    assert y.tobytes() == parent["expected"].tobytes()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_child_loads_and_runs_a_model(parent, method):
    y = run_in_child(method, _run_loaded, parent["path"], parent["x"])
    assert y.tobytes() == parent["expected"].tobytes()


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_session_sent_to_a_child(parent, method):
    """A Session pickles as its graph and thread count; the child plans it anew."""
    y = run_in_child(method, _run_sent, parent["session"], parent["x"])
    assert y.tobytes() == parent["expected"].tobytes()


def test_parent_still_runs_after_its_children(parent):
    (y,) = parent["session"].run(None, {"x": parent["x"]})
    assert y.tobytes() == parent["expected"].tobytes()


def test_session_pickles_without_its_plans(parent):
    copy = pickle.loads(pickle.dumps(parent["session"]))
    assert isinstance(copy, Session) and copy.threads == parent["session"].threads
    (y,) = copy.run(None, {"x": parent["x"]})
    assert y.tobytes() == parent["expected"].tobytes()


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="the tbb wheel is a dependency on Linux x86_64 only")
def test_tbb_wheel_is_the_threading_layer(parent):
    """Where pabnn depends on the `tbb` wheel, numba runs its kernels on TBB (as fast as OpenMP),
    not on the slower workqueue, unless NUMBA_THREADING_LAYER chose otherwise."""
    if "NUMBA_THREADING_LAYER" in os.environ:
        pytest.skip("NUMBA_THREADING_LAYER chooses the layer in this run")
    assert numba.threading_layer() == "tbb"
