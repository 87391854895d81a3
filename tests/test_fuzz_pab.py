"""Fuzzing the .pab loader: damaged and hostile files load with identical results or raise FormatError.

Two valid files are the seeds: a tiny float model and a small PA model (PAConv, PALinear,
ChannelAffine, pools, Add, Reshape, Softmax; tests/small_models.py). Mutations:

- raw bytes: bit flips, overwritten runs, truncation, appended bytes, a huge header length;
  a damaged file must be refused (the padding between blobs is checked to be zero too), or,
  where the damage left every byte as it was, run bit for bit like the original;
- splices: the start of one valid file glued to the end of another (spliced headers and blobs);
- header JSON with the checksum recomputed, so the checks behind the checksum are reached:
  values replaced by any JSON (huge ints, NaN, Infinity, bools, strings, nested objects),
  keys deleted, list entries duplicated or swapped (duplicate names, broken topological order),
  duplicate object keys. A mutated header may describe another valid model: then it must load,
  build a Session and run (or refuse the input with InputError); attributes and parameters
  no stored op has, and plan-only ops, are refused;
- blob contents with their checksums recomputed: NaN/Inf parameters are refused.

Every file that loads and runs also runs in a forked child (the Session inherited, as a server's
workers do) with the same outputs. Never another exception. Case counts are printed at the end of the run (tests/fuzzing.py).
"""
import copy
import hashlib
import json

import numpy as np
import pytest
from child_processes import run_session_in_forked_child
from fuzzing import fuzz_settings, record
from hypothesis import example, given
from hypothesis import strategies as st
from pab_files import split_file, tiny_graph
from small_models import INPUT_SHAPE, small_pa_graph

from pabnn.engine import FormatError, Graph, GraphError, InputError, Node, Session, TensorInfo, load_graph, save
from pabnn.engine.ops import registered_ops
from pabnn.engine.ops.registry import check_stored_node
from pabnn.engine.ops._attrs import MAX_DIMENSION
from pabnn.engine.pab_format import _PREFIX, ALIGNMENT, FORMAT_VERSION, MAGIC

HEADER_ROOM = 1 << 16  # spare header bytes in the seed files, so that edited headers fit


def build_file(header, blobs, room):
    """A .pab file of `header` (JSON text or dict) and raw blob bytes placed at the offsets the
    header gives; the header is padded with spaces to `room` bytes and its checksum is correct."""
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= room, "edited header does not fit the room"
    text += b" " * (room - len(text))
    out = bytearray(_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, room, hashlib.sha256(text).digest()) + text)
    return bytes(out) + b"".join(blobs)


def roomy(data):
    """The same file with HEADER_ROOM more header bytes (blob offsets moved accordingly).
    -> (file bytes, header dict, header room, [blob bytes including the padding before each])."""
    (_, _, _, header_length, _), header, _ = split_file(data)
    room = header_length + HEADER_ROOM
    shift = room - header_length
    assert shift % ALIGNMENT == 0
    header = copy.deepcopy(header)
    pieces = []
    previous_end = _PREFIX.size + header_length
    for entry in header["blobs"]:
        pieces.append(data[previous_end:entry["offset"] + entry["nbytes"]])
        previous_end = entry["offset"] + entry["nbytes"]
        entry["offset"] += shift
    return build_file(header, pieces, room), header, room, pieces


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """{name: seed} for the tiny float file and the small PA file, each with its expected outputs."""
    folder = tmp_path_factory.mktemp("fuzz-pab")
    result = {}
    for name, graph, shape in (("tiny", tiny_graph(), (2, 5, 5)), ("small", small_pa_graph(), INPUT_SHAPE)):
        save(graph, folder / f"{name}.pab")
        data, header, room, pieces = roomy((folder / f"{name}.pab").read_bytes())
        x = np.random.default_rng(3).standard_normal((2, *shape)).astype(np.float32)
        expected = Session(load_graph(write(folder, "check.pab", data))).run(None, {"x": x})
        result[name] = dict(data=data, header=header, room=room, pieces=pieces, x=x, expected=expected,
                            folder=folder)
    return result


def write(folder, name, data):
    path = folder / name
    path.write_bytes(data)
    return path


def load_and_run(seed, data, test, same_model):
    """Load `data`; it must raise FormatError naming the file, or load and run.

    same_model: the damage cannot change the model, so a loaded file must give outputs bit for
    bit equal to the seed's. Otherwise a loaded file may be another valid model: it must build a
    Session and run the seed's input, or refuse that input with InputError. Returns the outcome.
    """
    path = write(seed["folder"], "damaged.pab", data)
    try:
        graph = load_graph(path)
    except FormatError as error:
        assert str(path) in str(error)
        outcome = "FormatError"
    else:
        session = Session(graph)
        try:
            outputs = session.run(None, {name: seed["x"] for name in session.input_names})
        except InputError:
            assert not same_model
            outcome = "loaded, input refused (InputError)"
        else:
            # The same Session in a forked child (a server's worker) gives the same outputs.
            forked = run_session_in_forked_child(session, {name: seed["x"] for name in session.input_names})
            assert all(a.tobytes() == b.tobytes() for a, b in zip(forked, outputs))
            shapes = graph.infer_shapes()
            for name, output in zip(session.output_names, outputs):
                assert output.dtype == np.float32 and output.shape == (2,) + tuple(shapes[name][1:])
            same = len(outputs) == len(seed["expected"]) and all(
                a.shape == b.shape and a.tobytes() == b.tobytes() for a, b in zip(outputs, seed["expected"]))
            assert same or not same_model, "a damaged file loaded and ran with different outputs"
            outcome = "loaded, same outputs" if same else "loaded, another valid model"
    record(test, outcome)
    return outcome


SEED_NAMES = st.sampled_from(["tiny", "small"])


# ---- raw bytes --------------------------------------------------------------------------------

@fuzz_settings(ci_examples=80)
@given(name=SEED_NAMES, data=st.data())
def test_damaged_bytes_are_refused_or_harmless(seeds, name, data):
    seed = seeds[name]
    original = seed["data"]
    kind = data.draw(st.sampled_from(["flip", "overwrite", "truncate", "append"]), label="kind")
    # Half of the positions fall in the prefix and header, where every check lives.
    header_end = _PREFIX.size + seed["room"]
    position = data.draw(st.one_of(st.integers(0, header_end - 1), st.integers(0, len(original) - 1)),
                         label="position")
    damaged = bytearray(original)
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            damaged[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
            position = data.draw(st.integers(0, len(original) - 1), label="next position")
    elif kind == "overwrite":
        run = data.draw(st.binary(min_size=1, max_size=64), label="bytes")
        damaged[position:position + len(run)] = run
        damaged = damaged[:len(original)]
    elif kind == "truncate":
        damaged = damaged[:position]
    else:
        damaged += data.draw(st.binary(min_size=1, max_size=128), label="appended")
    load_and_run(seed, bytes(damaged), "damaged bytes", same_model=True)


@fuzz_settings(ci_examples=20)
@given(name=SEED_NAMES, header_length=st.one_of(
    st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**31, 2**63, 2**64 - 1, 64 << 20, (64 << 20) + 1])))
def test_any_header_length_is_refused_or_exact(seeds, name, header_length):
    seed = seeds[name]
    magic, version, reserved, _, digest = _PREFIX.unpack_from(seed["data"])
    damaged = _PREFIX.pack(magic, version, reserved, header_length, digest) + seed["data"][_PREFIX.size:]
    outcome = load_and_run(seed, damaged, "header length", same_model=True)
    assert outcome == "FormatError" or header_length == seed["room"]


@fuzz_settings(ci_examples=30)
@given(first=SEED_NAMES, second=SEED_NAMES, data=st.data())
def test_spliced_files_are_refused_unless_the_splice_is_exact(seeds, first, second, data):
    """The start of one file glued to the end of another: a spliced prefix, header or blob run."""
    a, b = seeds[first]["data"], seeds[second]["data"]
    cut_a = data.draw(st.integers(0, len(a)), label="cut in first")
    cut_b = data.draw(st.one_of(st.just(cut_a), st.integers(0, len(b))), label="cut in second")
    spliced = a[:cut_a] + b[cut_b:]
    same = spliced in (a, b)
    seed = seeds[first] if spliced == a else seeds[second]
    outcome = load_and_run(seed, spliced, "spliced files", same_model=True)
    assert outcome == "FormatError" or same


# ---- the header JSON, checksum recomputed -----------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70),
    st.sampled_from([2**31, 2**32, 2**53 + 1, 2**63, 2**64, 10**18, -10**18, 10**40, MAX_DIMENSION + 1, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["float32", "uint64", "float64", "Conv", "PAConv", "Relu", "x", "y", "c", "f",
                     "zero_before_quantizer", "pabnn"]),
)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=6), st.dictionaries(st.text(max_size=6), children, max_size=3)), max_leaves=12)


def paths(value, prefix=()):
    """Every path (tuple of keys and indexes) into a JSON value, the value itself excluded."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append(prefix + (key,))
        found.extend(paths(child, prefix + (key,)))
    return found


def nudged(value, draw):
    """A near miss of an existing value: off by one, doubled, negated, huge, or a bool/float twin."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return draw(JSON_VALUES, label="replacement")
    return draw(st.sampled_from([value + 1, value - 1, value * 2, -value, value * 2**40, float(value),
                                 bool(value), str(value), [value]]), label="nudged")


def mutate(header, draw):
    """Apply one to three random edits to the header dict in place."""
    for _ in range(draw(st.integers(1, 3), label="edits")):
        # Three edits in four go to the graph: the blob table is mostly guarded by checksums.
        in_graph = draw(st.sampled_from([True, True, True, False]), label="in graph")
        candidates = [("graph",) + p for p in paths(header.get("graph"))] if in_graph else []
        candidates = candidates or paths(header)
        if not candidates:
            return
        path = draw(st.sampled_from(candidates), label="path")
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = draw(st.sampled_from(["replace", "nudge", "nudge", "delete", "duplicate", "swap"]), label="action")
        if action == "replace":
            parent[key] = draw(JSON_VALUES, label="value")
        elif action == "nudge":
            parent[key] = nudged(parent[key], draw)
        elif action == "delete":
            del parent[key]
        elif action == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif action == "swap" and isinstance(parent, list) and len(parent) > 1:
            other = draw(st.integers(0, len(parent) - 1), label="other")
            parent[key], parent[other] = parent[other], parent[key]


@fuzz_settings(ci_examples=120)
@given(name=SEED_NAMES, data=st.data())
@example(name="small", data=None)  # the unedited roomy seed loads with identical outputs
def test_edited_header_is_refused_or_a_valid_model(seeds, name, data):
    seed = seeds[name]
    header = copy.deepcopy(seed["header"])
    if data is not None:
        mutate(header, data.draw)
    text = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    if data is not None and data.draw(st.booleans(), label="duplicate a key"):
        text = b'{"format":"pabnn",' + text[1:]
    load_and_run(seed, build_file(text, seed["pieces"], seed["room"]), "edited header",
                 same_model=data is None)


def test_json_constants_and_overflowing_numbers_are_refused(seeds, tmp_path):
    seed = seeds["tiny"]
    text = json.dumps(seed["header"], separators=(",", ":"))
    for token in ("NaN", "Infinity", "-Infinity", "1e999"):
        edited = text.replace('"note":"tiny"', f'"note":{token}')
        assert edited != text
        path = write(tmp_path, "constant.pab", build_file(edited.encode(), seed["pieces"], seed["room"]))
        with pytest.raises(FormatError, match="header is not valid JSON"):
            load_graph(path)


def test_duplicate_keys_are_refused(seeds, tmp_path):
    seed = seeds["tiny"]
    text = json.dumps(seed["header"], separators=(",", ":")).replace('"note":"tiny"', '"note":"a","note":"b"')
    path = write(tmp_path, "duplicate.pab", build_file(text.encode(), seed["pieces"], seed["room"]))
    with pytest.raises(FormatError, match="duplicate key 'note'"):
        load_graph(path)


# ---- blob contents, checksums recomputed -------------------------------------------------------

def with_blob(seed, index, raw):
    """The seed file with blob `index` replaced by `raw` (same length), its checksum recomputed."""
    header = copy.deepcopy(seed["header"])
    entry = header["blobs"][index]
    assert len(raw) == entry["nbytes"]
    entry["sha256"] = hashlib.sha256(raw).hexdigest()
    pieces = list(seed["pieces"])
    pieces[index] = pieces[index][:len(pieces[index]) - entry["nbytes"]] + raw
    return build_file(header, pieces, seed["room"])


def float_blobs(seed):
    return [i for i, entry in enumerate(seed["header"]["blobs"]) if entry["dtype"] == "float32"]


@fuzz_settings(ci_examples=30)
@given(name=SEED_NAMES, data=st.data())
def test_non_finite_parameters_are_refused(seeds, name, data):
    seed = seeds[name]
    index = data.draw(st.sampled_from(float_blobs(seed)), label="blob")
    entry = seed["header"]["blobs"][index]
    values = np.frombuffer(seed["pieces"][index][-entry["nbytes"]:], dtype="<f4").copy()
    position = data.draw(st.integers(0, values.size - 1), label="position")
    values[position] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="value")
    path = write(seed["folder"], "nan.pab", with_blob(seed, index, values.tobytes()))
    node = next(node for node in seed["header"]["graph"]["nodes"] if index in node["params"].values())
    key = next(key for key, value in node["params"].items() if value == index)
    with pytest.raises(FormatError) as error:
        load_graph(path)
    assert node["name"] in str(error.value) and repr(key) in str(error.value) and "NaN or Inf" in str(error.value)
    record("non-finite parameters", "FormatError")


# ---- any op, any attributes ---------------------------------------------------------------------

ATTRIBUTE_KEYS = ["strides", "pads", "dilations", "kernel_shape", "group", "axis", "axes", "shape", "alpha", "beta",
                  "min", "max", "keepdims", "mode", "scales", "sizes", "output_padding", "perm", "starts", "ends",
                  "steps", "value", "count_include_pad", "constant_first", "in_channels", "padding_rule", "split",
                  "epsilon", "activation", "input_planes", "output_planes", "input_planes_pads"]  # the last three: no op has them
PARAMETERS = st.builds(lambda shape, dtype: np.ones(shape, dtype=dtype), st.lists(st.integers(0, 3), max_size=5),
                       st.sampled_from([np.float32, np.uint64, np.int64]))


@fuzz_settings(ci_examples=100)
@given(op=st.sampled_from([op.name for op in registered_ops()]),
       attrs=st.dictionaries(st.sampled_from(ATTRIBUTE_KEYS), JSON_VALUES, max_size=4),
       params=st.dictionaries(st.sampled_from(["weight", "bias", "constant", "slope", "scale", "shift",
                                               "output_thresholds"]), PARAMETERS,
                              max_size=3),
       shape=st.lists(st.integers(1, 6), max_size=5),
       inputs=st.integers(1, 2))  # no inputs at all: test_robustness.py::test_pa_conv_without_inputs_is_refused
def test_any_node_is_refused_with_graph_error_or_runs(op, attrs, params, shape, inputs):
    """What a .pab header can say about one node reaches the loader's checks as JSON values: the
    attributes and parameters its op declares, then the op's shape rule. They raise GraphError
    (FormatError from the loader), or the node builds a Session and runs."""
    node = Node(op, "node", ["x"] * inputs, ["y"], attrs, params)
    graph = Graph([TensorInfo("x", (None, *shape))], ["y"], [node])
    try:
        check_stored_node(node)
        shapes = graph.infer_shapes()
    except GraphError as error:
        assert "'node'" in str(error) or "'x'" in str(error) or "'y'" in str(error), str(error)
        record("any node", "GraphError")
        return
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    (y,) = Session(graph).run(None, {"x": x})
    assert y.shape == (2,) + tuple(shapes["y"][1:])
    record("any node", "valid, ran")
