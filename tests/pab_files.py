"""Building valid and damaged .pab files for the tests: split a file into prefix, header and blobs,
edit the JSON header and recompute its checksum, and a tiny graph to save.
"""
import copy
import hashlib
import json

import numpy as np

from pabnn.engine import Graph, Node, TensorInfo
from pabnn.engine.pab_format import _PREFIX, FORMAT_VERSION, MAGIC


def split_file(data):
    """(prefix fields, header dict, bytes after the header) of a valid .pab file."""
    magic, version, reserved, header_length, header_hash = _PREFIX.unpack_from(data)
    header_bytes = data[_PREFIX.size:_PREFIX.size + header_length]
    return (magic, version, reserved, header_length, header_hash), json.loads(header_bytes), \
        data[_PREFIX.size + header_length:]


def repack(header, rest, header_length, version=FORMAT_VERSION, magic=MAGIC):
    """Prefix + header (JSON padded with spaces to header_length, so that blob offsets stay valid)
    + rest, with a correct header checksum."""
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    assert len(header_bytes) <= header_length, "the edited header no longer fits the original room"
    header_bytes += b" " * (header_length - len(header_bytes))
    prefix = _PREFIX.pack(magic, version, 0, len(header_bytes), hashlib.sha256(header_bytes).digest())
    return prefix + header_bytes + rest


def rewrite_header(data, edit):
    """The file `data` with its JSON header changed by edit(header) in place, checksum recomputed."""
    (_, _, _, header_length, _), header, rest = split_file(data)
    header = copy.deepcopy(header)
    edit(header)
    return repack(header, rest, header_length)


def flip_bit(data, position, bit=0):
    damaged = bytearray(data)
    damaged[position] ^= 1 << bit
    return bytes(damaged)


def tiny_graph(seed=0):
    """Float Conv(2->4, 3x3, pad 1) + Relu + Flatten + Gemm(100->3) on [batch, 2, 5, 5]."""
    rng = np.random.default_rng(seed)
    conv = Node("Conv", "conv", ["x"], ["c"], {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1],
                                                "group": 1},
                {"weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
                 "bias": rng.standard_normal(4).astype(np.float32)})
    relu = Node("Relu", "relu", ["c"], ["r"])
    flatten = Node("Flatten", "flatten", ["r"], ["f"])
    gemm = Node("Gemm", "fc", ["f"], ["y"], {},
                {"weight": rng.standard_normal((3, 100)).astype(np.float32),
                 "bias": rng.standard_normal(3).astype(np.float32)})
    return Graph([TensorInfo("x", (None, 2, 5, 5))], ["y"], [conv, relu, flatten, gemm], {"note": "tiny"})
