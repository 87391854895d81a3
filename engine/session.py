"""Session: runs a Graph with the fast kernels, like onnxruntime's InferenceSession."""
import numba
import numpy as np

from .errors import InputError
from .graph import run_graph
from .ops import get_op
from .pab_format import load_graph


class Session:
    """Runs `graph` with the numba/numpy kernels (float32 activations).

    threads: number of numba threads the kernels use (None: numba's default, all cores).
    """

    def __init__(self, graph, threads=None):
        self.graph = graph
        self.shapes = graph.infer_shapes()
        if threads is not None and not (isinstance(threads, int) and 1 <= threads <= numba.config.NUMBA_NUM_THREADS):
            raise ValueError(f"threads must be an int in 1..{numba.config.NUMBA_NUM_THREADS}, found {threads!r}")
        self.threads = threads
        self._kernels = {node.name: get_op(node.op, node.name).make_kernel(node) for node in graph.nodes}

    @property
    def input_names(self):
        return [info.name for info in self.graph.inputs]

    @property
    def output_names(self):
        return list(self.graph.outputs)

    def run(self, output_names, feeds):
        """Run the graph. output_names: list of names, or None for all graph outputs.

        feeds: {input name: array [batch, ...]} (converted to float32). Returns a list of float32
        arrays in the order of output_names.
        """
        output_names = self.output_names if output_names is None else list(output_names)
        for name in output_names:
            if name not in self.shapes:
                raise InputError(f"unknown output {name!r}; graph outputs: {self.output_names}")
        arrays = self._check_feeds(feeds)
        previous_threads = numba.get_num_threads()
        if self.threads is not None:
            numba.set_num_threads(self.threads)
        try:
            values = run_graph(self.graph, arrays, lambda node: self._kernels[node.name], keep=output_names)
        finally:
            numba.set_num_threads(previous_threads)
        return [np.asarray(values[name], dtype=np.float32) for name in output_names]

    def _check_feeds(self, feeds):
        if not isinstance(feeds, dict):
            raise InputError(f"feeds must be a dict {{input name: array}}, found {type(feeds).__name__}")
        unknown = sorted(set(feeds) - set(self.input_names))
        missing = [name for name in self.input_names if name not in feeds]
        if unknown or missing:
            raise InputError(f"inputs expected: {self.input_names}; missing: {missing}; unknown: {unknown}")
        arrays = {}
        batch = None
        for info in self.graph.inputs:
            value = feeds[info.name]
            try:
                array = np.ascontiguousarray(value, dtype=np.float32)
            except (TypeError, ValueError) as error:
                raise InputError(f"input {info.name!r}: cannot be read as float32: {error}") from None
            if array.ndim != len(info.shape) or array.shape[1:] != tuple(info.shape[1:]):
                expected = ["batch"] + list(info.shape[1:])
                raise InputError(f"input {info.name!r}: expected shape {expected}, found {list(array.shape)}")
            if array.shape[0] < 1:
                raise InputError(f"input {info.name!r}: batch must be at least 1, found {array.shape[0]}")
            if batch is not None and array.shape[0] != batch:
                raise InputError(f"input {info.name!r}: batch {array.shape[0]} differs from the other inputs' {batch}")
            batch = array.shape[0]
            arrays[info.name] = array
        return arrays


def load(path, threads=None):
    """Load a .pab file and return a Session for it (raises FormatError on a bad file)."""
    return Session(load_graph(path), threads=threads)
