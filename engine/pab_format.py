"""The .pab file: one self-describing file holding a Graph and its parameter arrays.

Layout (all integers little-endian):

    offset  size  field
    0       8     magic b"PABNN\\x00\\r\\n" (the CR LF catches text-mode transfers)
    8       4     format version, uint32
    12      4     reserved, zero
    16      8     header length in bytes, uint64
    24      32    SHA-256 of the header
    56      ...   header: UTF-8 JSON {"format", "graph", "blobs", "metadata"}
    ...           blobs, each starting at a multiple of 64 bytes, zero bytes between

A graph input entry is {"name", "shape"} and, for an input with symbolic sizes (engine/graph.py),
"symbols": one entry per axis, null for a fixed axis, else the symbol's name; "shape" then holds
the example sizes. Files without symbolic sizes are unchanged, so version 1 still describes every
file: a pabnn that predates symbols reads a file with them as one fixed at its example sizes.

Each blob entry in the header gives dtype (float32, uint64, or int8 for the weights of integer
layers: a pabnn without integer layers refuses such a file naming the dtype), shape, offset,
nbytes and its SHA-256. Nodes refer to
blobs by index, and hold only the attributes and parameters their op declares for a stored graph
(`Op.attributes`, `Op.parameters`; plan-only state never comes from a file). The loader checks every field, offset, length and checksum, then the graph
itself (ops, attributes, shapes), before anything runs; any defect raises FormatError naming the
file and the field. Writes are atomic: a temporary file in the same folder, fsync, rename.

The header is strict JSON: NaN, Infinity and numbers that overflow a float are refused, and so
are duplicate keys in an object. Size limits keep a crafted header from making the loader or a
Session allocate unbounded memory or run unbounded work: MAX_HEADER_BYTES for the header, the
tensor limits of `engine/ops/_attrs.py` (MAX_RANK, MAX_DIMENSION, MAX_SAMPLE_ELEMENTS) for every
tensor and geometry attribute, and MAX_SAMPLE_OPS for the work of one sample. Parameters are
bounded by the file itself (every blob byte must be in the file).
"""
import hashlib
import json
import math
import os
import struct
import tempfile

import numpy as np

from .errors import FormatError, GraphError
from .graph import Graph, Node, TensorInfo
from .ops import get_op
from .ops.registry import check_stored_node
from .ops._attrs import MAX_DIMENSION, MAX_RANK, is_int

MAGIC = b"PABNN\x00\r\n"
FORMAT_VERSION = 1
ALIGNMENT = 64
_PREFIX = struct.Struct("<8sII Q 32s")
BLOB_DTYPES = {"float32": np.float32, "uint64": np.uint64, "int8": np.int8}
MAX_HEADER_BYTES = 64 << 20
MAX_SYMBOL_LENGTH = 64
# Operations (FLOPs + 2 * int MACs + BOPs/64, as `pabnn report` counts them) of one sample: 1000x a ResNet-50.
MAX_SAMPLE_OPS = 4 * 10**12


def save(graph, path):
    """Write `graph` to `path` atomically (the old file, if any, stays intact until the rename)."""
    graph.infer_shapes()
    blobs = []
    nodes = []
    for node in graph.nodes:
        check_stored_node(node)
        param_refs = {}
        for key, array in node.params.items():
            array = np.ascontiguousarray(array)
            if array.dtype.name not in BLOB_DTYPES:
                raise GraphError(f"node {node.name!r}: parameter {key!r} has unsupported dtype {array.dtype}")
            param_refs[key] = len(blobs)
            blobs.append(array.astype(array.dtype.newbyteorder("<"), copy=False))
        nodes.append({"op": node.op, "name": node.name, "inputs": list(node.inputs),
                      "outputs": list(node.outputs), "attrs": node.attrs, "params": param_refs})
    header = {
        "format": "pabnn",
        "graph": {
            "inputs": [_input_entry(t) for t in graph.inputs],
            "outputs": list(graph.outputs),
            "nodes": nodes,
        },
        "blobs": [],
        "metadata": graph.metadata,
    }
    # Blob offsets depend on the header length, which depends on the offsets: lay the blobs out
    # with a generous header size estimate, then fix it once the real header is known.
    header_room = len(json.dumps(header)) + 160 * len(blobs) + ALIGNMENT
    while True:
        offset = _align(_PREFIX.size + header_room)
        header["blobs"] = []
        for array in blobs:
            header["blobs"].append({"dtype": array.dtype.name, "shape": list(array.shape), "offset": offset,
                                    "nbytes": array.nbytes, "sha256": hashlib.sha256(array.tobytes()).hexdigest()})
            offset = _align(offset + array.nbytes)
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        if len(header_bytes) <= header_room:
            break
        header_room = len(header_bytes) + ALIGNMENT
    header_bytes += b" " * (header_room - len(header_bytes))  # JSON ignores trailing spaces
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_bytes), hashlib.sha256(header_bytes).digest())
    _write_atomically(path, prefix + header_bytes, header["blobs"], blobs)


def _input_entry(info):
    entry = {"name": info.name, "shape": list(info.shape)}
    if info.symbol_axes():
        entry["symbols"] = list(info.symbols)
    return entry


def _align(offset):
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _write_atomically(path, head, entries, blobs):
    def write(handle):
        handle.write(head)
        for entry, array in zip(entries, blobs):
            handle.write(b"\0" * (entry["offset"] - handle.tell()))
            handle.write(array.tobytes())
    write_atomically(path, write, ".pab")


def write_atomically(path, write, suffix):
    """Make the file `path` by write(handle) into a temporary file beside it (named .tmp-*`suffix`),
    synced to disk and renamed over `path`, then sync the folder: readers see the old file or the
    whole new one, and a failure leaves nothing behind."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-", suffix=suffix, delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.unlink(handle.name)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_graph(path):
    """Read and validate a .pab file; returns the Graph. Raises FormatError on any defect."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise FormatError(f"{path}: cannot read: {error.strerror}") from None
    try:
        return _parse(data, path)
    except GraphError as error:
        raise FormatError(f"{path}: invalid graph: {error}") from None


def _parse(data, path):
    def fail(message):
        raise FormatError(f"{path}: {message}")

    if len(data) < _PREFIX.size:
        fail(f"file is {len(data)} bytes, shorter than the {_PREFIX.size}-byte .pab prefix")
    magic, version, reserved, header_length, header_hash = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        fail(f"not a .pab file (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        newer = "a newer pabnn" if version > FORMAT_VERSION else "re-converting the model with this pabnn"
        fail(f"format version {version} is not readable by this pabnn (reads version {FORMAT_VERSION}); "
             f"it needs {newer}")
    if reserved != 0:
        fail(f"reserved prefix field is {reserved}, expected 0")
    if header_length > min(MAX_HEADER_BYTES, len(data) - _PREFIX.size):
        fail(f"header length {header_length} exceeds the file ({len(data)} bytes) or the {MAX_HEADER_BYTES}-byte limit")
    header_bytes = data[_PREFIX.size:_PREFIX.size + header_length]
    if hashlib.sha256(header_bytes).digest() != header_hash:
        fail("header checksum mismatch (the file is damaged)")
    try:
        header = json.loads(header_bytes.decode("utf-8"), parse_constant=_refuse_constant,
                            parse_float=_finite_float, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        fail(f"header is not valid JSON: {type(error).__name__}: {error}")
    _check_type(header, dict, "header", fail)
    if header.get("format") != "pabnn":
        fail("header field 'format' must be 'pabnn'")
    blobs = _parse_blobs(_check_type(header.get("blobs"), list, "blobs", fail), data,
                         _PREFIX.size + header_length, fail)
    graph_json = _check_type(header.get("graph"), dict, "graph", fail)
    metadata = _check_type(header.get("metadata", {}), dict, "metadata", fail)
    inputs = []
    for index, entry in enumerate(_check_type(graph_json.get("inputs"), list, "graph.inputs", fail)):
        where = f"graph.inputs[{index}]"
        _check_type(entry, dict, where, fail)
        shape = _check_type(entry.get("shape"), list, f"{where}.shape", fail)
        if not 1 <= len(shape) <= MAX_RANK or shape[0] is not None \
                or not all(is_int(d) and 1 <= d <= MAX_DIMENSION for d in shape[1:]):
            fail(f"{where}.shape must be [null (the batch), then at most {MAX_RANK - 1} ints in "
                 f"1..{MAX_DIMENSION}], found {shape!r}")
        symbols = entry.get("symbols")
        if symbols is not None:
            _check_type(symbols, list, f"{where}.symbols", fail)
            if len(symbols) != len(shape) or symbols[0] is not None or not all(
                    name is None or (isinstance(name, str) and 1 <= len(name) <= MAX_SYMBOL_LENGTH)
                    for name in symbols):
                fail(f"{where}.symbols must be one entry per axis of the shape: null for the batch and fixed axes, "
                     f"else a name of 1..{MAX_SYMBOL_LENGTH} characters; found {symbols!r}")
            symbols = tuple(symbols)
        inputs.append(TensorInfo(_check_type(entry.get("name"), str, f"{where}.name", fail), tuple(shape), symbols))
    outputs = _check_type(graph_json.get("outputs"), list, "graph.outputs", fail)
    for index, name in enumerate(outputs):
        _check_type(name, str, f"graph.outputs[{index}]", fail)
    if not outputs or len(set(outputs)) != len(outputs):
        fail(f"graph.outputs must be a non-empty list of distinct names, found {outputs!r}")
    nodes = []
    used = set()
    for index, entry in enumerate(_check_type(graph_json.get("nodes"), list, "graph.nodes", fail)):
        where = f"graph.nodes[{index}]"
        _check_type(entry, dict, where, fail)
        names = {key: _check_type(entry.get(key), str, f"{where}.{key}", fail) for key in ("op", "name")}
        tensors = {key: _check_type(entry.get(key), list, f"{where}.{key}", fail) for key in ("inputs", "outputs")}
        for key, values in tensors.items():
            for position, name in enumerate(values):
                _check_type(name, str, f"{where}.{key}[{position}]", fail)
        attrs = _check_type(entry.get("attrs", {}), dict, f"{where}.attrs", fail)
        params = {}
        for key, blob_index in _check_type(entry.get("params", {}), dict, f"{where}.params", fail).items():
            if not isinstance(blob_index, int) or isinstance(blob_index, bool) or not 0 <= blob_index < len(blobs):
                fail(f"{where}.params.{key}: blob index {blob_index!r} out of range (0..{len(blobs) - 1})")
            if blob_index in used:
                fail(f"{where}.params.{key}: blob {blob_index} is referenced twice")
            used.add(blob_index)
            params[key] = blobs[blob_index]
        node = Node(names["op"], names["name"], tensors["inputs"], tensors["outputs"], attrs, params)
        try:
            check_stored_node(node)
        except GraphError as error:
            fail(f"{where}: {error}")
        nodes.append(node)
    if len(used) != len(blobs):
        fail(f"{len(blobs) - len(used)} blob(s) are referenced by no node")
    graph = Graph(inputs, outputs, nodes, metadata)
    _check_sizes(graph, graph.infer_shapes(), fail)
    return graph


def _check_sizes(graph, shapes, fail):
    """One sample's work within MAX_SAMPLE_OPS (Graph.infer_shapes bounds every tensor's size)."""
    ops = 0
    for node in graph.nodes:
        cost = get_op(node.op, node.name).cost(node, [shapes[n] for n in node.inputs], [shapes[n] for n in node.outputs])
        ops += cost.flops + 2 * cost.int_macs + cost.bops / 64
    if ops > MAX_SAMPLE_OPS:
        fail(f"one sample needs {ops:.3g} operations, above the limit of {MAX_SAMPLE_OPS:.3g}")


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows a float")
    return value


def _unique_keys(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r} in an object")
        result[key] = value
    return result


def _check_type(value, kind, where, fail):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        fail(f"header field {where} must be a {kind.__name__}, found {type(value).__name__}")
    return value


def _parse_blobs(entries, data, header_end, fail):
    arrays = []
    previous_end = header_end
    for index, entry in enumerate(entries):
        where = f"blobs[{index}]"
        _check_type(entry, dict, where, fail)
        dtype_name = entry.get("dtype")
        if not isinstance(dtype_name, str) or dtype_name not in BLOB_DTYPES:
            fail(f"{where}.dtype {dtype_name!r} is not one of {sorted(BLOB_DTYPES)}")
        shape = _check_type(entry.get("shape"), list, f"{where}.shape", fail)
        if len(shape) > MAX_RANK or not all(is_int(d) and 0 <= d < 2**40 for d in shape):
            fail(f"{where}.shape {shape!r} must be at most {MAX_RANK} non-negative ints")
        offset = _check_type(entry.get("offset"), int, f"{where}.offset", fail)
        nbytes = _check_type(entry.get("nbytes"), int, f"{where}.nbytes", fail)
        dtype = np.dtype(BLOB_DTYPES[dtype_name]).newbyteorder("<")
        expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if nbytes != expected:
            fail(f"{where}.nbytes is {nbytes}, but shape {shape} of {dtype_name} needs {expected}")
        if offset % ALIGNMENT:
            fail(f"{where}.offset {offset} is not a multiple of {ALIGNMENT}")
        if offset < previous_end:
            fail(f"{where}.offset {offset} overlaps the header or the previous blob (ends at {previous_end})")
        if offset + nbytes > len(data):
            fail(f"{where} ends at byte {offset + nbytes}, past the end of the file ({len(data)} bytes): truncated?")
        if data[previous_end:offset].count(0) != offset - previous_end:
            fail(f"{where}: the {offset - previous_end} padding bytes before it (from byte {previous_end}) must be zero")
        raw = data[offset:offset + nbytes]
        if hashlib.sha256(raw).hexdigest() != entry.get("sha256"):
            fail(f"{where} checksum mismatch (the file is damaged)")
        arrays.append(np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False))
        previous_end = offset + nbytes
    if len(data) != previous_end:
        fail(f"{len(data) - previous_end} unexpected bytes after the last blob (ends at {previous_end})")
    return arrays
