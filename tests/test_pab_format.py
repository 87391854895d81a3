"""The .pab file: exact round trips, atomic writes, and a clear FormatError for every defect.

Damaged files are built three ways: by cutting or flipping raw bytes, by editing the prefix, and
by rewriting the JSON header with a correct checksum (`rewrite_header`), so that the checks
behind the checksum (offsets, sizes, dtypes, ops, tensor names, parameter shapes) are reached.
"""
import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pabnn.converters import convert
from pabnn.engine import FormatError, GraphError, Session, load_graph, save
from pabnn.engine import pab_format
from pabnn.engine.pab_format import _PREFIX, ALIGNMENT, FORMAT_VERSION, MAGIC
from pab_files import flip_bit, repack, rewrite_header, split_file, tiny_graph

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
ONNX_MODEL = EXAMPLES / "digits_resnet.onnx"
SAMPLE = EXAMPLES / "digits_sample.npz"
RESERVED_FIELD = range(12, 16)  # prefix bytes 12..15: "reserved, zero"


# ---- helpers (split_file, repack, rewrite_header, flip_bit, tiny_graph live in pab_files.py) --

def write(folder, name, data):
    path = Path(folder) / name
    path.write_bytes(data)
    return path


def expect_format_error(path, *fragments):
    """load_graph(path) raises FormatError (not a subclass of anything else) naming the file and
    containing every fragment."""
    with pytest.raises(FormatError) as info:
        load_graph(path)
    assert type(info.value) is FormatError
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_same_graph(loaded, original):
    assert [(t.name, tuple(t.shape)) for t in loaded.inputs] == [(t.name, tuple(t.shape)) for t in original.inputs]
    assert loaded.outputs == original.outputs
    assert loaded.metadata == original.metadata
    assert len(loaded.nodes) == len(original.nodes)
    for got, want in zip(loaded.nodes, original.nodes):
        assert (got.op, got.name, list(got.inputs), list(got.outputs)) == \
            (want.op, want.name, list(want.inputs), list(want.outputs))
        assert got.attrs == want.attrs, got.name
        assert sorted(got.params) == sorted(want.params), got.name
        for key, array in want.params.items():
            assert got.params[key].dtype == array.dtype, (got.name, key)
            assert got.params[key].shape == array.shape, (got.name, key)
            assert got.params[key].tobytes() == np.ascontiguousarray(array).tobytes(), (got.name, key)


def run_session(graph, images):
    return Session(graph).run(None, {graph.inputs[0].name: images})


def assert_bitwise_equal(outputs, expected):
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()




# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample():
    with np.load(SAMPLE) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def model_graph(sample):
    """The example ResNet converted at PA(2,2): float and PA nodes, float32 and uint64 blobs."""
    return convert(ONNX_MODEL, calibration=sample["calibration"][:64], weight_bases=2, act_bases=2).graph


@pytest.fixture(scope="module")
def model_file(model_graph, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "digits.pab"
    save(model_graph, path)
    return path


@pytest.fixture(scope="module")
def model_bytes(model_file):
    return model_file.read_bytes()


@pytest.fixture(scope="module")
def images(sample):
    return sample["evaluation"][:16]


# ---- round trip -------------------------------------------------------------------------------

def test_round_trip_keeps_nodes_attributes_and_parameters(model_graph, model_file):
    loaded = load_graph(model_file)
    assert_same_graph(loaded, model_graph)
    dtypes = {array.dtype for node in loaded.nodes for array in node.params.values()}
    assert dtypes == {np.dtype(np.float32), np.dtype(np.uint64)}
    assert any(node.op == "PAConv" for node in loaded.nodes)


def test_round_trip_session_outputs_are_bitwise_identical(model_graph, model_file, images):
    expected = run_session(model_graph, images)
    assert_bitwise_equal(run_session(load_graph(model_file), images), expected)


def test_saving_a_loaded_graph_reproduces_the_file(model_file, model_bytes, tmp_path):
    again = tmp_path / "again.pab"
    save(load_graph(model_file), again)
    assert again.read_bytes() == model_bytes


def test_blobs_are_aligned_and_padding_is_zero(model_bytes):
    (_, _, reserved, header_length, _), header, _ = split_file(model_bytes)
    assert reserved == 0
    covered = np.zeros(len(model_bytes), dtype=bool)
    covered[:_PREFIX.size + header_length] = True
    for entry in header["blobs"]:
        assert entry["offset"] % ALIGNMENT == 0
        covered[entry["offset"]:entry["offset"] + entry["nbytes"]] = True
    gaps = np.frombuffer(model_bytes, dtype=np.uint8)[~covered]
    assert not gaps.any()
    last = header["blobs"][-1]
    assert len(model_bytes) == last["offset"] + last["nbytes"]


def test_tiny_graph_round_trip(tmp_path):
    graph = tiny_graph()
    save(graph, tmp_path / "tiny.pab")
    loaded = load_graph(tmp_path / "tiny.pab")
    assert_same_graph(loaded, graph)
    x = np.random.default_rng(1).standard_normal((3, 2, 5, 5)).astype(np.float32)
    assert_bitwise_equal(run_session(loaded, x), run_session(graph, x))


# ---- atomic writes ----------------------------------------------------------------------------

def temporary_files(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".tmp-"))


def test_save_leaves_no_temporary_file(tmp_path):
    save(tiny_graph(), tmp_path / "a.pab")
    save(tiny_graph(seed=1), tmp_path / "a.pab")  # replace an existing file
    assert temporary_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pab"]
    assert_same_graph(load_graph(tmp_path / "a.pab"), tiny_graph(seed=1))


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_save_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch, failing):
    path = tmp_path / "model.pab"
    save(tiny_graph(), path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(pab_format.os, failing, broken)
    with pytest.raises(OSError, match="simulated"):
        save(tiny_graph(seed=1), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert temporary_files(tmp_path) == []


def test_unsupported_parameter_dtype_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.pab"
    save(tiny_graph(), path)
    before = path.read_bytes()
    graph = tiny_graph(seed=1)
    graph.nodes[0].params["bias"] = graph.nodes[0].params["bias"].astype(np.float64)
    with pytest.raises(GraphError, match="bias"):
        save(graph, path)
    assert path.read_bytes() == before
    assert temporary_files(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_file_permissions_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save(tiny_graph(), tmp_path / "model.pab")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(os.stat(tmp_path / "model.pab").st_mode)
    assert mode == 0o666 & ~umask
    assert mode != 0o600


# ---- damaged files: raw bytes -----------------------------------------------------------------

def test_missing_file(tmp_path):
    expect_format_error(tmp_path / "absent.pab", "cannot read")


def test_empty_file(tmp_path):
    expect_format_error(write(tmp_path, "empty.pab", b""), "0 bytes", "prefix")


def test_random_bytes(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    expect_format_error(write(tmp_path, "random.pab", data), "not a .pab file")


def test_onnx_file(tmp_path):
    expect_format_error(write(tmp_path, "model.pab", ONNX_MODEL.read_bytes()), "not a .pab file")


def test_wrong_magic(tmp_path, model_bytes):
    expect_format_error(write(tmp_path, "magic.pab", b"PABNN\x00\n\n" + model_bytes[8:]), "not a .pab file",
                        "magic")


@pytest.mark.parametrize("version, advice", [(2, "newer pabnn"), (0, "re-converting")])
def test_other_format_versions_say_which_version_is_readable(tmp_path, model_bytes, version, advice):
    (_, _, _, header_length, _), header, rest = split_file(model_bytes)
    data = repack(header, rest, header_length, version=version)
    expect_format_error(write(tmp_path, f"v{version}.pab", data), f"format version {version}",
                        f"reads version {FORMAT_VERSION}", advice)


def test_header_length_larger_than_the_file(tmp_path, model_bytes):
    magic, version, reserved, _, header_hash = _PREFIX.unpack_from(model_bytes)
    prefix = _PREFIX.pack(magic, version, reserved, len(model_bytes), header_hash)
    expect_format_error(write(tmp_path, "long.pab", prefix + model_bytes[_PREFIX.size:]),
                        f"header length {len(model_bytes)}", "exceeds the file")


def truncation_points(data):
    (_, _, _, header_length, _), header, _ = split_file(data)
    first, last = header["blobs"][0], header["blobs"][-1]
    return {
        "inside prefix": 30,
        "after prefix": _PREFIX.size,
        "inside header": _PREFIX.size + header_length // 2,
        "inside first blob": first["offset"] + first["nbytes"] // 2,
        "inside last blob": last["offset"] + last["nbytes"] // 2,
        "last byte missing": len(data) - 1,
    }


@pytest.mark.parametrize("where, fragment", [
    ("inside prefix", "prefix"),
    ("after prefix", "exceeds the file"),
    ("inside header", "exceeds the file"),
    ("inside first blob", "past the end of the file"),
    ("inside last blob", "past the end of the file"),
    ("last byte missing", "past the end of the file"),
])
def test_truncated_file(tmp_path, model_bytes, where, fragment):
    length = truncation_points(model_bytes)[where]
    expect_format_error(write(tmp_path, "cut.pab", model_bytes[:length]), fragment)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_flipped_bit_in_header(tmp_path, model_bytes, where):
    header_length = _PREFIX.unpack_from(model_bytes)[3]
    position = _PREFIX.size + {"start": 0, "middle": header_length // 2, "end": header_length - 1}[where]
    expect_format_error(write(tmp_path, "flip.pab", flip_bit(model_bytes, position, bit=3)),
                        "header checksum mismatch")


def test_flipped_bit_in_header_checksum(tmp_path, model_bytes):
    expect_format_error(write(tmp_path, "flip.pab", flip_bit(model_bytes, 40)), "header checksum mismatch")


@pytest.mark.parametrize("index", [0, 5, -1])
def test_flipped_bit_in_blob_names_the_blob(tmp_path, model_bytes, index):
    _, header, _ = split_file(model_bytes)
    blobs = header["blobs"]
    index = index % len(blobs)
    entry = blobs[index]
    data = flip_bit(model_bytes, entry["offset"] + entry["nbytes"] // 2, bit=6)
    expect_format_error(write(tmp_path, "flip.pab", data), f"blobs[{index}] checksum mismatch")


# ---- damaged files: a rewritten header with a correct checksum ---------------------------------

def test_rewrite_helper_without_edits_gives_a_loadable_file(tmp_path, model_bytes, model_graph):
    data = rewrite_header(model_bytes, lambda header: None)
    assert_same_graph(load_graph(write(tmp_path, "same.pab", data)), model_graph)


def node_index(header, op):
    return next(i for i, node in enumerate(header["graph"]["nodes"]) if node["op"] == op)


def misalign(header):
    header["blobs"][1]["offset"] += 8


def overlap(header):
    header["blobs"][1]["offset"] = header["blobs"][0]["offset"]


def bad_nbytes(header):
    header["blobs"][0]["nbytes"] += 4


def unknown_dtype(header):
    header["blobs"][0]["dtype"] = "float16"


def unknown_op(header):
    header["graph"]["nodes"][node_index(header, "Relu")]["op"] = "NoSuchOp"


def undefined_input(header):
    header["graph"]["nodes"][node_index(header, "PAConv")]["inputs"] = ["nowhere"]


def dangling_blob_index(header):
    header["graph"]["nodes"][node_index(header, "Gemm")]["params"]["weight"] = len(header["blobs"])


def blob_used_twice(header):
    nodes = header["graph"]["nodes"]
    nodes[node_index(header, "Gemm")]["params"]["bias"] = nodes[node_index(header, "Conv")]["params"]["bias"]


def unreferenced_blob(header):
    del header["graph"]["nodes"][node_index(header, "Gemm")]["params"]["bias"]


def swap_blob_shapes(header):
    """Swap the shapes of two blobs with equal dtype and size but different shapes: every size and
    checksum stays right, only the graph check can see it."""
    blobs = header["blobs"]
    for i, a in enumerate(blobs):
        for b in blobs[i + 1:]:
            if a["dtype"] == b["dtype"] and a["nbytes"] == b["nbytes"] and a["shape"] != b["shape"]:
                a["shape"], b["shape"] = b["shape"], a["shape"]
                return
    raise AssertionError("no two blobs of the same size and different shapes")


def reshape_conv_weight(header):
    """The float stem Conv weight [16, 1, 3, 3] read as [16, 9, 1, 1]: same bytes, same rank."""
    node = header["graph"]["nodes"][node_index(header, "Conv")]
    entry = header["blobs"][node["params"]["weight"]]
    assert entry["shape"] == [16, 1, 3, 3]
    entry["shape"] = [16, 9, 1, 1]


def wrong_attribute_type(header):
    header["graph"]["nodes"][node_index(header, "PAConv")]["attrs"]["strides"] = "1,1"


def unknown_padding_rule(header):
    header["graph"]["nodes"][node_index(header, "PAConv")]["attrs"]["padding_rule"] = "sign_then_zero"


def stray_pa_conv_attribute(header):
    header["graph"]["nodes"][node_index(header, "PAConv")]["attrs"]["input_planes"] = True


def stray_pa_conv_parameter(header):
    """A PAConv's act_thresholds blob given to another as a parameter no PAConv has."""
    nodes = header["graph"]["nodes"]
    first = node_index(header, "PAConv")
    second = next(i for i in range(first + 1, len(nodes)) if nodes[i]["op"] == "PAConv")
    nodes[first]["params"]["output_thresholds"] = nodes[second]["params"].pop("act_thresholds")


def plan_only_op(header):
    """A PAConv stored as the plan-only BinaryConv it is lowered into (engine/plan.py)."""
    header["graph"]["nodes"][node_index(header, "PAConv")]["op"] = "BinaryConv"


def unknown_attribute(header):
    header["graph"]["nodes"][node_index(header, "Relu")]["attrs"]["alpha"] = 0.5


def undefined_output(header):
    header["graph"]["outputs"] = ["nowhere"]


def not_an_object(header):
    header.clear()
    header["format"] = "pabnn"
    header["blobs"] = {"0": 1}


@pytest.mark.parametrize("edit, fragments", [
    (misalign, ["blobs[1].offset", f"not a multiple of {ALIGNMENT}"]),
    (overlap, ["blobs[1].offset", "overlaps"]),
    (bad_nbytes, ["blobs[0].nbytes", "needs"]),
    (unknown_dtype, ["blobs[0].dtype", "'float16'", "float32"]),
    (unknown_op, ["unknown op 'NoSuchOp'", "/stem/stem.2/Relu", "supported ops:", "PAConv"]),
    (undefined_input, ["/stage1/conv1/Conv", "'nowhere'", "not a graph input"]),
    (dangling_blob_index, ["params.weight", "out of range"]),
    (blob_used_twice, ["params.bias", "referenced twice"]),
    (unreferenced_blob, ["referenced by no node"]),
    (swap_blob_shapes, ["invalid graph", "/stage1/conv1/Conv", "'weight_scales' must be a 2-d float32 array"]),
    (reshape_conv_weight, ["/stem/stem.0/Conv", "weight", "must have shape [16, 1, 1, 1]",
                             "found [16, 9, 1, 1]"]),
    (wrong_attribute_type, ["/stage1/conv1/Conv", "'strides'"]),
    (unknown_padding_rule, ["'sign_then_zero'", "not supported"]),
    (stray_pa_conv_attribute, ["graph.nodes[", "/stage1/conv1/Conv", "attribute 'input_planes'",
                               "expected attributes: in_channels"]),
    (stray_pa_conv_parameter, ["/stage1/conv1/Conv", "parameter 'output_thresholds'",
                               "expected parameters: weight_planes"]),
    (plan_only_op, ["/stage1/conv1/Conv", "op 'BinaryConv' exists only in a Session's plan"]),
    (unknown_attribute, ["/stem/stem.2/Relu", "attribute 'alpha'", "expected attributes: none"]),
    (undefined_output, ["graph output 'nowhere'"]),
    (not_an_object, ["blobs must be a list"]),
], ids=lambda value: value.__name__ if callable(value) else None)
def test_rewritten_header_defect(tmp_path, model_bytes, edit, fragments):
    expect_format_error(write(tmp_path, "edited.pab", rewrite_header(model_bytes, edit)), *fragments)


def test_nonzero_padding_is_refused(tmp_path, model_bytes):
    """A byte of the zero padding between two blobs overwritten, every checksum still right."""
    _, header, _ = split_file(model_bytes)
    entries = header["blobs"]
    blob = next(i for i in range(1, len(entries))
                if entries[i]["offset"] > entries[i - 1]["offset"] + entries[i - 1]["nbytes"])
    damaged = bytearray(model_bytes)
    damaged[entries[blob]["offset"] - 1] = 0x20
    expect_format_error(write(tmp_path, "padding.pab", bytes(damaged)), f"blobs[{blob}]", "padding bytes", "zero")


def test_plan_only_state_cannot_be_saved(tmp_path, model_graph):
    """The graph a Session plans (PAConvs lowered into plan-only PackPlanes/BinaryConv steps) is not a
    stored graph."""
    planned = Session(model_graph).plan_graph()
    assert any(node.op == "BinaryConv" for node in planned.nodes)
    with pytest.raises(GraphError, match="op '(PackPlanes|BinaryConv)' exists only in a Session's plan"):
        save(planned, tmp_path / "planned.pab")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [["float32"], {"name": "float32"}], ids=["list", "object"])
def test_blob_dtype_of_the_wrong_json_type(tmp_path, model_bytes, dtype):
    def edit(header):
        header["blobs"][0]["dtype"] = dtype

    expect_format_error(write(tmp_path, "edited.pab", rewrite_header(model_bytes, edit)), "blobs[0].dtype")


def test_deeply_nested_header(tmp_path):
    header_bytes = b'{"format":"pabnn","metadata":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    data = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_bytes), hashlib.sha256(header_bytes).digest())
    expect_format_error(write(tmp_path, "nested.pab", data + header_bytes), "header")


# ---- property: any single damage is either rejected or harmless -------------------------------

@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    graph = tiny_graph()
    save(graph, folder / "tiny.pab")
    data = (folder / "tiny.pab").read_bytes()
    x = np.random.default_rng(2).standard_normal((2, 2, 5, 5)).astype(np.float32)
    _, header, _ = split_file(data)
    assert header["blobs"][1]["offset"] > header["blobs"][0]["offset"] + header["blobs"][0]["nbytes"], \
        "the tiny file should hold padding between blobs"
    return {"folder": folder, "data": data, "x": x}


# Every byte is checked: the prefix and header by the header checksum and the fields, blobs by
# theirs, the padding between blobs by being zero. The explicit examples pin down one byte of each
# kind: inside a blob, padding after the first blob (4*2*3*3 float32 = 288 bytes, padded to 320)
# and a reserved byte.
@settings(max_examples=60, deadline=None)
@given(damage=st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
))
@example(damage=("flip", -1, 0xFF))  # last byte of the last blob
@example(damage=("flip", -2, 0x01))  # the padding byte before the second blob
@example(damage=("flip", 13, 0x80))  # a reserved byte
def test_single_damage_is_rejected_or_harmless(tiny_file, damage):
    kind, position, mask = damage
    data = tiny_file["data"]
    if position == -2:
        _, header, _ = split_file(data)
        position = header["blobs"][1]["offset"] - 1
    position %= len(data)
    if kind == "flip":
        damaged = bytearray(data)
        damaged[position] ^= mask
        damaged = bytes(damaged)
    else:
        damaged = data[:position]
    path = write(tiny_file["folder"], "damaged.pab", damaged)
    with pytest.raises(FormatError) as error:
        load_graph(path)
    assert str(path) in str(error.value)
