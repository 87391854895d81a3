"""Hostile files and inputs get clear errors, interrupted writes lose nothing, and results do not
depend on threads.

- crafted .pab headers (checksums recomputed) with huge, mistyped or inconsistent fields are
  refused with a FormatError naming the node or field, before anything large is allocated;
- Session.run checks its feeds: rank, shape, dtype, batch 0 (empty outputs), a huge batch (an
  InputError before allocation); non-contiguous, read-only, Fortran-ordered and big-endian
  arrays give the same bits as a plain float32 array, and the caller's array is never written;
- NaN at a binarization threshold becomes the lowest activation level (engine/bits.py),
  end to end through a converted model;
- an interrupted save (exception or KeyboardInterrupt mid-write) keeps the old file, in the
  library and through `pabnn convert` / `pabnn run`;
- one Session used from several threads gives the sequential results; sessions are independent;
  outputs are bitwise identical across runs and numba thread counts.
"""
import concurrent.futures
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pab_files import rewrite_header, tiny_graph
from small_models import INPUT_SHAPE, calibration_images, small_onnx_model, small_pa_graph

import pabnn.engine.session as session_module
from pabnn.converters import convert
from pabnn.engine import FormatError, InputError, PabnnError, Session, load, load_graph, run_reference, save
from pabnn.engine import cli, pab_format
from pabnn.engine.ops._attrs import MAX_DIMENSION, MAX_SAMPLE_ELEMENTS


@pytest.fixture(scope="module")
def pa_graph():
    return small_pa_graph()


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.pab"
    save(tiny_graph(), path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def images():
    return calibration_images(count=6, seed=11)


def write(folder, data):
    path = Path(folder) / "crafted.pab"
    path.write_bytes(data)
    return path


# ---- crafted headers --------------------------------------------------------------------------

def node(header, name):
    return next(entry for entry in header["graph"]["nodes"] if entry["name"] == name)


def set_attr(name, key, value):
    def edit(header):
        node(header, name)["attrs"][key] = value
    return edit


def set_input_shape(shape):
    def edit(header):
        header["graph"]["inputs"][0]["shape"] = shape
    return edit


def duplicate_tensor(header):
    node(header, "relu")["outputs"] = ["c"]  # "c" is the conv's output already


def duplicate_node_name(header):
    node(header, "relu")["name"] = "conv"


def no_outputs(header):
    header["graph"]["outputs"] = []


def repeated_output(header):
    header["graph"]["outputs"] = ["y", "y"]


def deep_blob_shape(header):
    header["blobs"][1]["shape"] = [1] * 63 + [4]


def huge_padded_input(header):
    node(header, "conv")["attrs"]["pads"] = [20000] * 4


def huge_output(header):
    """pads that keep the padded input under the element limit but make a huge Conv output."""
    node(header, "conv")["attrs"]["pads"] = [5790] * 4  # padded 2x11585x11585, output 4x11583x11583


def huge_pool_work(header):
    """A MaxPool whose output keeps the 5x5 size but whose windows have 399997**2 taps each."""
    nodes = header["graph"]["nodes"]
    index = nodes.index(node(header, "relu"))
    nodes.insert(index + 1, {"op": "MaxPool", "name": "big_pool", "inputs": ["r"], "outputs": ["p"], "params": {},
                             "attrs": {"kernel_shape": [399997] * 2, "pads": [399996] * 4, "strides": [100000] * 2}})
    node(header, "flatten")["inputs"] = ["p"]


@pytest.mark.parametrize("edit, fragments", [
    (set_attr("conv", "strides", [10**18, 1]), ["'conv'", "'strides'", f"1..{MAX_DIMENSION}"]),
    (set_attr("conv", "dilations", [1, 2**40]), ["'conv'", "'dilations'"]),
    (set_attr("conv", "pads", [1, 1, 1, -1]), ["'conv'", "'pads'"]),
    (set_attr("conv", "pads", [True, 1, 1, 1]), ["'conv'", "'pads'"]),
    (set_attr("conv", "strides", [1.0, 1.0]), ["'conv'", "'strides'"]),
    (set_attr("conv", "strides", {"h": 1}), ["'conv'", "'strides'"]),
    (set_attr("conv", "group", True), ["'conv'", "group"]),
    (set_attr("conv", "group", 2**64), ["'conv'", "group"]),
    (huge_padded_input, ["'conv'", "zero-padded input", str(MAX_SAMPLE_ELEMENTS)]),
    (huge_output, ["'conv'", "tensor 'c'", "beyond the limits"]),
    (huge_pool_work, ["operations", "above the limit"]),
    (set_input_shape([None, True, 5, 5]), ["graph.inputs[0].shape"]),
    (set_input_shape([None, 2, 5, 10**12]), ["graph.inputs[0].shape", str(MAX_DIMENSION)]),
    (set_input_shape([None, 2, 5, 5.0]), ["graph.inputs[0].shape"]),
    (set_input_shape([4, 2, 5, 5]), ["graph.inputs[0].shape", "null (the batch)"]),
    (set_input_shape([None] + [1] * 40), ["graph.inputs[0].shape", "at most"]),
    (set_input_shape([None, 2, -5, 5]), ["graph.inputs[0].shape"]),
    (duplicate_tensor, ["tensor 'c' is defined twice"]),
    (duplicate_node_name, ["node name 'conv' is used twice"]),
    (no_outputs, ["graph.outputs", "non-empty"]),
    (repeated_output, ["graph.outputs", "distinct"]),
    (deep_blob_shape, ["blobs[1].shape"]),
], ids=lambda value: getattr(value, "__name__", None) if callable(value) else None)
def test_crafted_tiny_header_is_refused(tmp_path, tiny_bytes, edit, fragments):
    path = write(tmp_path, rewrite_header(tiny_bytes, edit))
    with pytest.raises(FormatError) as error:
        load_graph(path)
    message = str(error.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.fixture(scope="module")
def pa_bytes(pa_graph, tmp_path_factory):
    path = tmp_path_factory.mktemp("pa") / "small.pab"
    save(pa_graph, path)
    return path.read_bytes()


@pytest.mark.parametrize("name, key, value, fragment", [
    ("pool1", "kernel_shape", [2**40, 2], "'kernel_shape'"),
    ("pool1", "kernel_shape", [2, 2, 2], "'kernel_shape'"),
    ("avgpool", "count_include_pad", True, "'count_include_pad'"),
    ("avgpool", "count_include_pad", 2, "'count_include_pad'"),
    ("softmax", "axis", True, "axis"),
    ("softmax", "axis", 2**70, "axis"),
    ("reshape", "shape", [10**30, -1], "'shape'"),
    ("reshape", "shape", [True, 12], "'shape'"),
    ("reshape", "shape", [1] * 20 + [12], "'shape'"),
    ("reshape", "shape", [-1, -1], "'shape'"),
    ("conv2", "strides", [10**18, 10**18], "'strides'"),
    ("conv2", "pads", [2**24, 0, 0, 0], "exceeds the limit"),
])
def test_crafted_pa_model_attribute_is_refused(tmp_path, pa_bytes, name, key, value, fragment):
    path = write(tmp_path, rewrite_header(pa_bytes, set_attr(name, key, value)))
    with pytest.raises(FormatError) as error:
        load_graph(path)
    assert f"'{name}'" in str(error.value) and fragment in str(error.value), str(error.value)


@pytest.mark.parametrize("name, param", [("conv1", "weight"), ("fc2", "bias"), ("bn0", "scale"),
                                         ("conv2", "act_thresholds")])
def test_non_finite_parameters_are_refused_in_memory(pa_graph, name, param):
    """The shape rules refuse NaN/Inf parameters, so neither a file nor a converter can run them."""
    from pabnn.engine import Graph, GraphError

    nodes = []
    for entry in pa_graph.nodes:
        params = dict(entry.params)
        if entry.name == name:
            params[param] = params[param].copy()
            params[param].reshape(-1)[0] = np.nan
        nodes.append(type(entry)(entry.op, entry.name, entry.inputs, entry.outputs, entry.attrs, params))
    with pytest.raises(GraphError, match=f"'{name}'.*'{param}' holds NaN or Inf"):
        Graph(pa_graph.inputs, pa_graph.outputs, nodes, {}).infer_shapes()


def test_weight_plane_bits_past_the_last_channel_are_refused(pa_graph):
    """Padding bits of the last word are not weights: a file that sets them would be counted by
    the popcount kernel but not by the reference, so it is refused."""
    from pabnn.engine import Graph, GraphError

    nodes = []
    for entry in pa_graph.nodes:
        params = dict(entry.params)
        if entry.name == "conv2":  # in_channels 8: bits 8..63 of each word are padding
            params["weight_planes"] = params["weight_planes"] | np.uint64(1 << 63)
        nodes.append(type(entry)(entry.op, entry.name, entry.inputs, entry.outputs, entry.attrs, params))
    with pytest.raises(GraphError, match="'conv2'.*weight_planes.*past in_channels"):
        Graph(pa_graph.inputs, pa_graph.outputs, nodes, {}).infer_shapes()


def without_inputs(header, op):
    header["graph"]["nodes"][next(i for i, n in enumerate(header["graph"]["nodes"]) if n["op"] == op)]["inputs"] = []


def test_conv_without_inputs_is_refused(tmp_path, pa_bytes):
    path = write(tmp_path, rewrite_header(pa_bytes, lambda header: without_inputs(header, "Conv")))
    with pytest.raises(FormatError, match="'conv1'.*expects 1 input"):
        load_graph(path)


def test_pa_conv_without_inputs_is_refused(tmp_path, pa_bytes):
    path = write(tmp_path, rewrite_header(pa_bytes, lambda header: without_inputs(header, "PAConv")))
    with pytest.raises(FormatError, match="'conv2'"):
        load_graph(path)


# ---- Session.run input checks -----------------------------------------------------------------

@pytest.fixture(scope="module")
def pa_session(pa_graph):
    return Session(pa_graph)


def plain(session, x):
    return session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})


@pytest.mark.parametrize("value, fragments", [
    (np.zeros((2, 3, 8)), ["'x'", "expected shape ['batch', 3, 8, 8]", "[2, 3, 8]"]),
    (np.zeros((2, 3, 8, 8, 1)), ["'x'", "expected shape"]),
    (np.zeros((2, 8, 8, 3)), ["'x'", "[2, 8, 8, 3]"]),
    (np.zeros(()), ["'x'", "expected shape"]),
    (np.zeros((2, 3, 8, 8), dtype=np.complex64), ["'x'", "complex64"]),
    (np.zeros((2, 3, 8, 8), dtype=bool), ["'x'", "bool"]),
    (np.zeros((2, 3, 8, 8), dtype=object), ["'x'", "object"]),
    (np.full((2, 3, 8, 8), "1.5"), ["'x'", "<U3"]),
    (np.zeros((2, 3, 8, 8), dtype="datetime64[s]"), ["'x'", "datetime64"]),
    ([[1, 2], [3]], ["'x'"]),
    ("an image", ["'x'"]),
])
def test_wrong_inputs_raise_input_error(pa_session, value, fragments):
    with pytest.raises(InputError) as error:
        pa_session.run(None, {"x": value})
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


@pytest.mark.parametrize("feeds, fragment", [
    ({}, "missing: ['x']"),
    ({"x": np.zeros((1, 3, 8, 8)), "extra": 1}, "unknown: ['extra']"),
    ({"x": np.zeros((1, 3, 8, 8)), 3: 1}, "unknown: [3]"),
    ([np.zeros((1, 3, 8, 8))], "must be a dict"),
])
def test_wrong_feed_names_raise_input_error(pa_session, feeds, fragment):
    with pytest.raises(InputError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        pa_session.run(None, feeds)


def layouts(x):
    """The same values as x in other memory layouts and dtypes that convert exactly to float32."""
    transposed = np.ascontiguousarray(x.transpose(3, 2, 1, 0)).transpose(3, 2, 1, 0)
    padded = np.zeros((x.shape[0] * 2,) + x.shape[1:], x.dtype)
    padded[::2] = x
    read_only = x.copy()
    read_only.flags.writeable = False
    return {
        "transposed view": transposed,
        "strided slice": padded[::2],
        "fortran order": np.asfortranarray(x),
        "read-only": read_only,
        "big-endian": x.astype(">f4"),
        "float64": x.astype(np.float64),
        "float16 values": x.astype(np.float16).astype(np.float32),
    }


@pytest.mark.parametrize("layout", list(layouts(np.zeros((1, 1, 1, 1), np.float32))))
def test_any_layout_gives_the_same_bits_and_the_input_is_not_written(pa_session, images, layout):
    x = layouts(images)[layout]
    if layout == "float16 values":
        expected = plain(pa_session, x)
    else:
        expected = plain(pa_session, images)
    before = x.copy()
    outputs = pa_session.run(None, {"x": x})
    assert [o.tobytes() for o in outputs] == [e.tobytes() for e in expected]
    np.testing.assert_array_equal(x, before)
    assert x.dtype == before.dtype


def test_integer_and_list_inputs_are_converted(pa_session):
    x = np.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8) % 7 - 3
    expected = plain(pa_session, x.astype(np.float32))
    for value in (x, x.astype(np.int8), x.astype(np.uint16) % 5, x.tolist()):
        if isinstance(value, np.ndarray) and value.dtype == np.uint16:
            expected_here = plain(pa_session, value.astype(np.float32))
        else:
            expected_here = expected
        outputs = pa_session.run(None, {"x": value})
        assert [o.tobytes() for o in outputs] == [e.tobytes() for e in expected_here]


def test_outputs_never_alias_the_input():
    """A graph whose output is a reshaped view of its input: the caller's array stays its own."""
    from pabnn.engine import Graph, Node, TensorInfo

    graph = Graph([TensorInfo("x", (None, 2, 3))], ["y"], [Node("Flatten", "flatten", ["x"], ["y"])])
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    (y,) = Session(graph).run(None, {"x": x})
    assert not np.shares_memory(x, y)
    y[...] = -1
    assert x.min() == 0


def test_float32_input_is_read_in_place_and_outputs_do_not_alias_it():
    """A C-contiguous float32 feed is used without a copy (the kernels only read it): an output
    that is a view of it (Identity-like Flatten, or a Slice) is copied out, and it is never written."""
    from pabnn.engine import Graph, Node, TensorInfo

    graph = Graph([TensorInfo("x", (None, 2, 3))], ["y", "z"],
                  [Node("Flatten", "flatten", ["x"], ["y"]), Node("Relu", "relu", ["x"], ["z"])])
    x = np.arange(-6, 6, dtype=np.float32).reshape(2, 2, 3)
    before = x.copy()
    session = Session(graph)
    arrays, _ = session._check_feeds({"x": x})
    assert arrays["x"] is x
    y, z = session.run(None, {"x": x})
    assert not np.shares_memory(x, y) and not np.shares_memory(x, z)
    np.testing.assert_array_equal(y, before.reshape(2, 6))
    np.testing.assert_array_equal(x, before)


def test_batch_zero_gives_empty_outputs_of_the_right_shape(pa_session, pa_graph):
    outputs = pa_session.run(None, {"x": np.zeros((0, *INPUT_SHAPE), np.float32)})
    assert [o.shape for o in outputs] == [(0, 5)]
    assert outputs[0].dtype == np.float32
    (hidden,) = pa_session.run(["c1"], {"x": np.zeros((0, *INPUT_SHAPE), np.float32)})
    assert hidden.shape == (0, 8, 8, 8)


def test_huge_batch_is_refused_before_allocation(pa_session):
    # A broadcast view: 10**8 samples that take no memory, so only the check can stop the run.
    x = np.broadcast_to(np.zeros((1, *INPUT_SHAPE), np.float32), (10**8, *INPUT_SHAPE))
    with pytest.raises(InputError) as error:
        pa_session.run(None, {"x": x})
    message = str(error.value)
    assert "batch 100000000" in message and "GiB" in message and "smaller batches" in message


def test_batch_limit_follows_max_run_bytes(pa_session, pa_graph, images, monkeypatch):
    per_sample = session_module.bytes_per_sample(pa_graph, pa_session.shapes)
    monkeypatch.setattr(session_module, "MAX_RUN_BYTES", per_sample * 4)
    assert len(pa_session.run(None, {"x": images[:4]})[0]) == 4
    with pytest.raises(InputError, match="batch 5 "):
        pa_session.run(None, {"x": images[:5]})


def test_available_memory_is_read_only_for_large_runs(pa_session, images, monkeypatch):
    """Runs above UNCHECKED_RUN_BYTES are refused beyond the memory the system reports available;
    smaller runs skip reading it."""
    reads = []
    monkeypatch.setattr(session_module, "_available_memory", lambda: reads.append(1) or 1024)
    assert len(pa_session.run(None, {"x": images[:2]})[0]) == 2 and not reads
    monkeypatch.setattr(session_module, "UNCHECKED_RUN_BYTES", 0)
    with pytest.raises(InputError, match="batch 2 .*smaller batches"):
        pa_session.run(None, {"x": images[:2]})
    assert reads


def test_bytes_per_sample_covers_the_largest_tensors(pa_graph, pa_session):
    shapes = pa_session.shapes
    per_sample = session_module.bytes_per_sample(pa_graph, shapes)
    largest = max(4 * int(np.prod(shape[1:])) for shape in shapes.values())
    # The input copy, the first conv's output (8x8x8) and its zero-padded input and im2col matrix.
    assert per_sample >= largest + 4 * int(np.prod(INPUT_SHAPE)) + 4 * 3 * (10 * 10 + 9 * 8 * 8)
    assert per_sample < 4 * sum(int(np.prod(shape[1:])) for shape in shapes.values()) * 20


# ---- NaN and Inf at a binarization threshold ---------------------------------------------------

@pytest.fixture(scope="module")
def first_layer_pa():
    """The small model with only its first conv binarized: its input is BatchNorm(x) per channel."""
    graph = convert(small_onnx_model(), calibration=calibration_images(), weight_bases=2, act_bases=3,
                    binarize=["conv1"]).graph
    assert [n.op for n in graph.nodes][:2] == ["ChannelAffine", "PAConv"]
    return graph


def beyond_every_threshold(graph, sign):
    """Per input channel, an x whose BatchNorm(x) lies below (sign -1) or above (+1) every threshold."""
    scale = graph.nodes[0].params["scale"].astype(np.float64)
    return (sign * np.sign(scale) * 1e30).reshape(1, -1, 1, 1)


@pytest.mark.parametrize("special, sign", [(np.nan, -1), (-np.inf, -1), (np.inf, 1)])
def test_nan_is_the_lowest_level_and_inf_the_extreme_levels_end_to_end(first_layer_pa, images, special, sign):
    """NaN compares false with every threshold, so it quantizes like a value below all of them."""
    x = images.copy()
    mask = np.zeros(x.shape, bool)
    mask[:, :, 2:5, 3] = True
    mask[0, 1, 7, 7] = True
    x[mask] = special
    # BatchNorm on the input keeps NaN as NaN and maps +-Inf to +-Inf times the channel's sign.
    x_special = np.where(mask, special if np.isnan(special) else special * np.sign(
        first_layer_pa.nodes[0].params["scale"]).reshape(1, -1, 1, 1), x).astype(np.float32)
    equivalent = np.where(mask, np.broadcast_to(beyond_every_threshold(first_layer_pa, sign), x.shape), x)
    session = Session(first_layer_pa)
    (outputs,) = session.run(None, {"x": x_special})
    (expected,) = session.run(None, {"x": equivalent.astype(np.float32)})
    assert np.all(np.isfinite(outputs))
    assert outputs.tobytes() == expected.tobytes()
    reference = run_reference(first_layer_pa, {"x": x_special})["y"]
    np.testing.assert_allclose(outputs, reference, rtol=1e-4, atol=1e-4)


def test_values_beyond_float32_become_infinite_without_warnings(first_layer_pa, images):
    x = images.astype(np.float64)
    x[0, 0, 0, 0] = -1e300
    with np.errstate(all="raise"):
        outputs = Session(first_layer_pa).run(None, {"x": x})
    expected = images.copy()
    expected[0, 0, 0, 0] = -np.inf
    assert outputs[0].tobytes() == Session(first_layer_pa).run(None, {"x": expected})[0].tobytes()


# ---- nothing lost -----------------------------------------------------------------------------

def temporaries(folder):
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp" in p.name)


class InterruptingFile:
    """A file object that raises `error` once more than `limit` bytes were written."""

    def __init__(self, handle, limit, error):
        self.handle, self.limit, self.error, self.written = handle, limit, error, 0

    def write(self, data):
        self.written += len(data)
        if self.written > self.limit:
            self.handle.write(bytes(data)[: len(data) - (self.written - self.limit)])
            raise self.error
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device (simulated)"),
                                   MemoryError()], ids=["KeyboardInterrupt", "OSError", "MemoryError"])
@pytest.mark.parametrize("limit", [10, 3000])  # inside the prefix; inside the blobs
def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch, pa_graph, error, limit):
    path = tmp_path / "model.pab"
    save(tiny_graph(), path)
    before = path.read_bytes()
    real = pab_format.tempfile.NamedTemporaryFile
    monkeypatch.setattr(pab_format.tempfile, "NamedTemporaryFile",
                        lambda *a, **k: InterruptingFile(real(*a, **k), limit, error))
    with pytest.raises(type(error)):
        save(pa_graph, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert temporaries(tmp_path) == []
    load_graph(path)


def test_interrupted_cli_convert_keeps_the_old_output(tmp_path, monkeypatch):
    model = tmp_path / "small.onnx"
    model.write_bytes(small_onnx_model().SerializeToString())
    calibration = tmp_path / "calibration.npy"
    np.save(calibration, calibration_images(count=8))
    output = tmp_path / "model.pab"
    save(tiny_graph(), output)
    before = output.read_bytes()
    real = pab_format.tempfile.NamedTemporaryFile
    monkeypatch.setattr(pab_format.tempfile, "NamedTemporaryFile",
                        lambda *a, **k: InterruptingFile(real(*a, **k), 2000, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        cli.main(["convert", str(model), "-o", str(output), "--calibration", str(calibration),
                  "--weight-bases", "1", "--act-bases", "1", "--force"])
    assert output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.npy", "model.pab", "small.onnx"]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device (simulated)")],
                         ids=["KeyboardInterrupt", "OSError"])
def test_interrupted_cli_run_keeps_the_old_output(tmp_path, monkeypatch, error):
    model = tmp_path / "tiny.pab"
    save(tiny_graph(), model)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((3, 2, 5, 5), np.float32))
    output = tmp_path / "y.npy"
    np.save(output, np.arange(4.0))
    before = output.read_bytes()
    real_save = np.save

    def interrupted_save(handle, array, *args, **kwargs):  # the CLI saves into an open temporary file
        handle.write(b"\x93NUMPY partial")
        raise error

    monkeypatch.setattr(cli.np, "save", interrupted_save)
    if isinstance(error, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            cli.main(["run", str(model), "--input", str(x), "--output", str(output), "--force"])
    else:
        assert cli.main(["run", str(model), "--input", str(x), "--output", str(output), "--force"]) == 1
    monkeypatch.setattr(cli.np, "save", real_save)
    assert output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pab", "x.npy", "y.npy"]


# ---- threads and determinism ------------------------------------------------------------------

def test_one_session_from_many_threads_equals_sequential_runs(pa_session):
    rng = np.random.default_rng(21)
    batches = [rng.standard_normal((1 + i % 3, *INPUT_SHAPE)).astype(np.float32) for i in range(12)]
    sequential = [pa_session.run(None, {"x": x})[0] for x in batches]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            concurrent_results = list(pool.map(lambda x: pa_session.run(None, {"x": x})[0], batches))
            for got, want in zip(concurrent_results, sequential):
                assert got.tobytes() == want.tobytes()


def test_sessions_with_different_thread_counts_run_concurrently_and_independently(pa_graph):
    tiny = Session(tiny_graph(seed=3), threads=1)
    small = Session(pa_graph, threads=2)
    rng = np.random.default_rng(22)
    tiny_inputs = [rng.standard_normal((2, 2, 5, 5)).astype(np.float32) for _ in range(6)]
    small_inputs = [rng.standard_normal((2, *INPUT_SHAPE)).astype(np.float32) for _ in range(6)]
    tiny_expected = [tiny.run(None, {"x": x})[0] for x in tiny_inputs]
    small_expected = [small.run(None, {"x": x})[0] for x in small_inputs]
    jobs = [(tiny, x) for x in tiny_inputs] + [(small, x) for x in small_inputs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: job[0].run(None, {"x": job[1]})[0], jobs))
    expected = tiny_expected + small_expected
    assert all(got.tobytes() == want.tobytes() for got, want in zip(results, expected))


def test_outputs_are_bitwise_identical_across_runs_and_thread_counts(pa_graph, images):
    results = []
    for threads in (1, 2, 1, 2):
        results.append(Session(pa_graph, threads=threads).run(None, {"x": images})[0].tobytes())
    results.append(Session(pa_graph).run(None, {"x": images})[0].tobytes())
    assert len(set(results)) == 1


def test_workqueue_threading_layer_is_serialized(tmp_path):
    """numba's workqueue layer aborts the process on concurrent parallel kernels; Session guards it."""
    model = tmp_path / "tiny.pab"
    save(tiny_graph(), model)
    script = textwrap.dedent(f"""
        import concurrent.futures, numba, numpy as np
        from pabnn.engine import load
        session = load({str(model)!r})
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal((64, 2, 5, 5)).astype(np.float32) for _ in range(16)]
        expected = [session.run(None, {{"x": x}})[0] for x in inputs]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda x: session.run(None, {{"x": x}})[0], inputs * 4))
        assert all(a.tobytes() == b.tobytes() for a, b in zip(got, expected * 4))
        print(numba.threading_layer())
    """)
    environment = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "workqueue"


def test_every_error_is_a_pabnn_error():
    for error in (FormatError, InputError):
        assert issubclass(error, PabnnError)
    with pytest.raises(PabnnError):
        load("/nonexistent/model.pab")
