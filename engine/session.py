"""Session: runs a Graph with the fast kernels, like onnxruntime's InferenceSession.

Inputs (`Session.run` feeds): any real numeric array (float or integer dtype; lists too) of shape
[batch, *per-sample shape]. A writeable, aligned, C-contiguous float32 array in native byte order is
used as it is (no copy: the kernels only read their inputs); anything else is converted to
float32 in a private copy, so non-contiguous, read-only or big-endian arrays work. The caller's
array is never written, and an output is never a view of it. Values beyond float32's range become +-Inf.
bool, complex, string and object arrays are refused. NaN and Inf run through: at a binarization
threshold `x >= s` is False for NaN, so a NaN becomes the lowest activation level, +Inf the
highest and -Inf the lowest (engine/bits.py). Batch 0 gives empty outputs (as onnxruntime).
A batch whose estimated working memory (`bytes_per_sample` x batch) exceeds MAX_RUN_BYTES or
the memory the system reports available is refused with InputError before anything is
allocated.

Sizes: an input axis with a symbolic size (`TensorInfo.symbols`, engine/graph.py) takes any size
the graph's shape rules accept. The Session makes a plan (fused graph, kernels, buffer plan) for
each set of sizes and outputs the first time it runs them, and keeps the PLAN_CACHE_SIZE plans used
last. Sizes the graph cannot take (a Flatten feeding a Gemm whose weight fixes the feature count,
a Reshape to a fixed shape, a kernel larger than the input) are refused with an InputError naming
the input, the node, its rule and the sizes that would work.

Threads: one Session may be used from several Python threads at once. `numba.set_num_threads`
is thread-local, so each call sets and restores its own thread count. numba's "workqueue"
threading layer cannot run parallel kernels from two threads at once; when it is the layer in
use (or before any kernel has run), calls are serialized by a process-wide lock.

Processes: a Session (or a new one) works in a child process started with fork, spawn or
forkserver, a Session made in the parent included. The threading layer is a fork-safe one
(engine/jit.py); the locks and thread pools a forked child inherits are made anew in it (a parent
thread may have held them at the fork); a Session pickles as its graph and thread count, so it
can be sent to a spawned child.
"""
import collections
import contextlib
import functools
from dataclasses import dataclass, field
import os
import sys
import threading

import time

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from . import amx as amx_tiles
from .errors import GraphError, InputError
from .graph import run_schedule, schedule
from .memory import plan_buffers
from .ops import _attrs, get_op
from .pab_format import load_graph
from .plan import lower

MAX_RUN_BYTES = 1 << 40
# Plans kept per Session (each set of input sizes and requested outputs has one); least recently used
# goes first.
PLAN_CACHE_SIZE = 16
# Runs needing less working memory than this are not checked against the memory the system
# reports available (a run of a few MiB is no risk, and the check costs a file read per run).
UNCHECKED_RUN_BYTES = 64 << 20
_WORKQUEUE_LOCK = threading.Lock()


def _count_when_held_by_one_dict():
    """sys.getrefcount of an array that only one dict refers to (measured: it differs between Python
    versions)."""
    holder = {0: np.empty(0)}
    return sys.getrefcount(holder[0])


_HELD_BY_ONE_DICT = _count_when_held_by_one_dict()


@dataclass
class _Plan:
    key: tuple  # (frozenset of requested outputs, sizes key)
    graph: object
    kernels: dict
    shapes: dict
    buffers: object
    uses_blas: bool  # some node's kernel calls numpy's BLAS
    bytes_per_sample: int  # `bytes_per_sample` of the stored graph for these outputs
    steps: list  # graph.schedule: each node's inputs, outputs and the tensors dropped after it
    # Per Python thread: (batch, the buffers); dropped with the plan when it leaves the cache.
    arenas: threading.local = field(default_factory=threading.local)


class Session:
    """Runs `graph` with the numba/numpy kernels (float32 activations).

    threads: number of numba threads the kernels use (None: numba's default, all cores).
    amx: whether binary layers run on AMX-INT8 tiles (engine/ops/amx_conv.py) where AmxConv takes
        them: None (default) where this CPU and OS allow it (engine/amx.py: available), False never
        (the portable AND-popcount kernels), True always (ValueError where it is not available).
    """

    def __init__(self, graph, threads=None, amx=None):
        self.graph = graph
        self.shapes = graph.infer_shapes()  # at the example sizes of the symbolic input sizes
        self.example_sizes = graph.symbols()
        if threads is not None and not (isinstance(threads, int) and 1 <= threads <= numba.config.NUMBA_NUM_THREADS):
            raise ValueError(f"threads must be an int in 1..{numba.config.NUMBA_NUM_THREADS}, found {threads!r}")
        self.threads = threads
        if amx not in (None, False, True):
            raise ValueError(f"amx must be None, False or True, found {amx!r}")
        if amx and not amx_tiles.available():
            raise ValueError("amx=True, but AMX-INT8 tiles are not available here (the CPU has no AMX-INT8, "
                             "numba compiles for another CPU, or the OS refused the tile permission)")
        self.amx = amx_tiles.available() if amx is None else amx
        self._plans = collections.OrderedDict()  # _Plan.key -> _Plan, least recently used first
        self._shapes_at = collections.OrderedDict()  # sizes key -> {tensor: shape} at those sizes
        self._plans_lock = threading.Lock()
        self._plans_lock_pid = os.getpid()
        self._plan(self.output_names, self._sizes_key(self.example_sizes))

    def __reduce__(self):
        return Session, (self.graph, self.threads, None if self.amx else False)

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
        arrays, sizes = self._check_feeds(feeds, output_names)
        if any(array.shape[0] == 0 for array in arrays.values()):
            shapes = self._shapes(sizes)
            return [np.empty((0,) + tuple(shapes[name][1:]), dtype=np.float32) for name in output_names]
        plan = self._plan(output_names, sizes)
        kernels, buffers = self._bound_kernels(plan, next(iter(arrays.values())).shape[0])
        with self._threads_limited(plan.uses_blas):
            values = run_schedule(plan.steps, kernels, arrays)
        results = [np.asarray(values[name], dtype=np.float32) for name in output_names]
        # An output that is a view into a buffer (say a Flatten of a planned conv) or into a feed used
        # without a copy (an Identity of the input) is copied out.
        shared = buffers + [array for name, array in arrays.items() if array is feeds[name]]
        return [result.copy() if any(np.may_share_memory(result, other) for other in shared) else result
                for result in results]

    def profile(self, feeds, repeats=5):
        """{node name: median seconds} of each node of the planned (fused) graph over `repeats`
        runs of the graph outputs. Node names are those of `self.plan_graph()`."""
        arrays, sizes = self._check_feeds(feeds, self.output_names)
        plan = self._plan(self.output_names, sizes)
        kernels, _ = self._bound_kernels(plan, next(iter(arrays.values())).shape[0])
        times = {node.name: [] for node in plan.graph.nodes}

        def timed(node, kernel):
            def run(inputs):
                start = time.perf_counter()
                outputs = kernel(inputs)
                times[node.name].append(time.perf_counter() - start)
                return outputs
            return run

        kernels = [timed(node, kernel) for node, kernel in zip(plan.graph.nodes, kernels)]
        with self._threads_limited(plan.uses_blas):
            for _ in range(repeats):
                run_schedule(plan.steps, kernels, arrays)
        return {name: float(np.median(values)) for name, values in times.items()}

    def plan_graph(self, output_names=None, sizes=None):
        """The graph this session runs for `output_names` (default: the graph outputs) at the symbolic
        input `sizes` ({symbol: size}; default: the example sizes)."""
        return self._plan(self.output_names if output_names is None else output_names,
                          self._sizes_key(self._checked_sizes(sizes))).graph

    def planned_bytes_per_sample(self, output_names=None, sizes=None):
        """Float32 bytes per sample of the buffers the planned graph's intermediates share."""
        return self._plan(self.output_names if output_names is None else output_names,
                          self._sizes_key(self._checked_sizes(sizes))).buffers.bytes_per_sample()

    def cached_plans(self):
        """[(sorted requested outputs, {symbol: size})] of the plans held, least recently used first."""
        with self._lock():
            return [(sorted(outputs), dict(sizes)) for outputs, sizes in self._plans]

    @contextlib.contextmanager
    def _threads_limited(self, limit_blas=True):
        """numba threads (thread-local) set to `threads`, and the BLAS to one thread when
        `limit_blas` (the plan calls it), for one run.

        One BLAS thread: OpenBLAS's workers spin for a long time after each call, on the very
        cores numba's kernels run on next (ResNet-18 PA(4,5) at 2 threads on 2 cores: 58 ms with
        2 BLAS threads, 38 ms with 1). threads=None leaves numba's count as it is."""
        previous_threads = numba.get_num_threads()
        if self.threads is not None:
            numba.set_num_threads(self.threads)
        try:
            with _serialize_if_workqueue(), (_BlasThreads.limit(1) if limit_blas else contextlib.nullcontext()):
                yield
        finally:
            numba.set_num_threads(previous_threads)

    def _lock(self):
        if self._plans_lock_pid != os.getpid():  # a forked child: a parent thread may have held it
            self._plans_lock, self._plans_lock_pid = threading.Lock(), os.getpid()
        return self._plans_lock

    @staticmethod
    def _sizes_key(sizes):
        return tuple(sorted(sizes.items()))

    def _checked_sizes(self, sizes):
        """{symbol: size} with every symbol of the graph (default: the example sizes)."""
        if sizes is None:
            return dict(self.example_sizes)
        if not isinstance(sizes, dict) or set(sizes) - set(self.example_sizes) or not all(
                _attrs.is_int(size) and 1 <= size <= _attrs.MAX_DIMENSION for size in sizes.values()):
            raise InputError(f"sizes must be a dict {{symbol: positive int}} over the graph's symbols "
                             f"{sorted(self.example_sizes)}, found {sizes!r}")
        return dict(self.example_sizes, **sizes)

    def _shapes(self, sizes):
        """{tensor: shape} at these symbolic sizes; raises InputError (naming the input, the node and
        its rule) for sizes the graph cannot take."""
        key = self._sizes_key(sizes)
        with self._lock():
            if key in self._shapes_at:
                self._shapes_at.move_to_end(key)
                return self._shapes_at[key]
        try:
            shapes = self.graph.at_sizes(sizes).infer_shapes()
        except GraphError as error:
            raise InputError(_size_error(self.graph, sizes, error)) from None
        with self._lock():
            self._shapes_at[key] = shapes
            while len(self._shapes_at) > PLAN_CACHE_SIZE:
                self._shapes_at.popitem(last=False)
        return shapes

    def _plan(self, output_names, sizes):
        """The plan for these outputs at these sizes: the graph lowered once (engine/plan.py: epilogues
        fused, binary layers as packing and binary-convolution steps that hand bit-planes on), its
        kernels, and the buffers its intermediates share (engine/memory.py).

        Requested tensors are never fused away or planned, so each set of outputs has its own plan;
        each set of symbolic sizes has its own too (shapes and buffers differ)."""
        sizes_key = sizes if isinstance(sizes, tuple) else self._sizes_key(sizes)
        key = (frozenset(output_names), sizes_key)
        with self._lock():
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key]
        self._shapes(dict(sizes_key))  # an InputError for sizes the graph cannot take
        bound = self.graph.at_sizes(dict(sizes_key))
        graph = lower(bound, keep=output_names, amx=self.amx)
        kernels = {node.name: get_op(node.op, node.name).make_kernel(node) for node in graph.nodes}
        shapes = graph.infer_shapes()
        uses_blas = any(get_op(node.op, node.name).uses_blas for node in graph.nodes)
        plan = _Plan(key, graph, kernels, shapes, plan_buffers(graph, shapes, keep=output_names), uses_blas,
                     bytes_per_sample(self.graph, self._shapes(dict(sizes_key)), output_names),
                     schedule(graph, output_names))
        with self._lock():
            plan = self._plans.setdefault(key, plan)  # another thread may have planned it meanwhile
            self._plans.move_to_end(key)
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan

    def _bound_kernels(self, plan, batch):
        """([the kernel of each node of plan.graph, given its output buffer when it has one in the
        plan], the buffers), made once per Python thread, plan and batch size.

        Buffers are allocated once per thread, plan and batch size (a new batch size replaces
        them), so concurrent runs from several Python threads never share them. A requested output
        written by an op with an output buffer gets an array of its own, kept by the plan: the
        next run writes into it again only if nothing else refers to it any more (the caller has
        dropped the result), else into a new array, so a returned result never changes. The steps
        whose op keeps state (registry.Op.keeps_state: their bit-planes and codes, their last call)
        get a dict each with the buffers, so it goes with them."""
        arena = getattr(plan.arenas, "arena", (None,))
        if arena[0] != batch:
            buffers = [np.empty(elements * batch, dtype=np.float32) for elements in plan.buffers.slot_elements]
            results = {}
            kernels = [_bound_kernel(plan, node, batch, buffers, results) for node in plan.graph.nodes]
            arena = (batch, buffers, kernels)
            plan.arenas.arena = arena
        return arena[2], arena[1]

    def _check_feeds(self, feeds, output_names=None):
        """({input name: C-contiguous float32 array}, {symbol: size}), after checking names, dtypes,
        shapes, the symbolic sizes, the batch and the memory the run would need (before converting
        or allocating anything). A feed that is already a writeable, aligned, C-contiguous native
        float32 array is returned as it is, any other is copied."""
        if not isinstance(feeds, dict):
            raise InputError(f"feeds must be a dict {{input name: array}}, found {type(feeds).__name__}")
        unknown = sorted(set(feeds) - set(self.input_names), key=repr)
        missing = [name for name in self.input_names if name not in feeds]
        if unknown or missing:
            raise InputError(f"inputs expected: {self.input_names}; missing: {missing}; unknown: {unknown}")
        values = {}
        batch = None
        sizes = {}
        for info in self.graph.inputs:
            value = feeds[info.name]
            if not isinstance(value, np.ndarray):
                try:
                    value = np.asarray(value)
                except (TypeError, ValueError) as error:
                    raise InputError(f"input {info.name!r}: not an array: {error}") from None
            if value.dtype.kind not in "fiu":
                raise InputError(f"input {info.name!r}: dtype {value.dtype} is not a real number type; expected "
                                 "float32 (float and integer arrays are converted)")
            symbols = info.symbols or (None,) * len(info.shape)
            if value.ndim != len(info.shape) or any(
                    found != expected for found, expected, symbol in zip(value.shape[1:], info.shape[1:], symbols[1:])
                    if symbol is None):
                expected = ["batch"] + [expected if symbol is None else symbol
                                        for expected, symbol in zip(info.shape[1:], symbols[1:])]
                raise InputError(f"input {info.name!r}: expected shape {expected}, found {list(value.shape)}")
            for axis, symbol in info.symbol_axes():
                size = value.shape[axis]
                if not 1 <= size <= _attrs.MAX_DIMENSION:
                    raise InputError(f"input {info.name!r}: {symbol} (axis {axis}) must be in "
                                     f"1..{_attrs.MAX_DIMENSION}, found {size}")
                if sizes.setdefault(symbol, size) != size:
                    raise InputError(f"input {info.name!r}: {symbol} (axis {axis}) is {size} but {sizes[symbol]} "
                                     f"elsewhere; one symbol has one size in a run")
            if batch is not None and value.shape[0] != batch:
                raise InputError(f"input {info.name!r}: batch {value.shape[0]} differs from the other inputs' {batch}")
            batch = value.shape[0]
            values[info.name] = value
        if batch:  # (the plan's shapes raise an InputError for sizes the graph cannot take)
            per_sample = self._plan(self.output_names if output_names is None else output_names, sizes).bytes_per_sample
            need = batch * per_sample
            # /proc/meminfo is read only for a run that needs more than UNCHECKED_RUN_BYTES (reading it
            # cost 8-100 microseconds a run, more on a busy machine).
            limit = MAX_RUN_BYTES
            if need > UNCHECKED_RUN_BYTES and need <= limit:
                limit = min(limit, _available_memory() or limit)
            if need > limit:
                raise InputError(f"batch {batch} needs about {batch * per_sample / 2**30:.3g} GiB "
                                 f"({per_sample:,} bytes per sample), above the {limit / 2**30:.3g} GiB this "
                                 f"process may use; run it in smaller batches")
        with np.errstate(over="ignore"):  # float64 values beyond float32's range become +-Inf
            return ({name: value if _usable_as_is(value) else np.array(value, dtype=np.float32, order="C", copy=True)
                     for name, value in values.items()}, sizes)


def _usable_as_is(array):
    """Whether the kernels can read `array` without a copy: float32 in native byte order, C-contiguous
    and aligned. Read-only arrays are copied too: numba compiles a separate kernel signature for them."""
    flags = array.flags
    return (type(array) is np.ndarray and array.dtype == np.float32 and array.dtype.isnative
            and flags.c_contiguous and flags.aligned and flags.writeable)


# How far _size_error looks for the sizes that work: up to this multiple of the larger of the
# given and the example size.
_SEARCH_FACTOR = 4


def _size_error(graph, sizes, error):
    """The message for symbolic input sizes the graph cannot take: which input and sizes, the node
    and rule that refused them (the GraphError), and for each symbol the sizes that would work with
    the other symbols as given (searched in 1..4x the larger of the given and the example size)."""
    where = []
    for info in graph.inputs:
        named = [f"{symbol} {sizes[symbol]}" for _, symbol in info.symbol_axes()]
        if named:
            where.append(f"input {info.name!r} {', '.join(named)}")
    hints = []
    examples = graph.symbols()
    for symbol, size in sorted(sizes.items()):
        limit = min(_SEARCH_FACTOR * max(size, examples[symbol]), _attrs.MAX_DIMENSION)
        working = []
        for candidate in range(1, limit + 1):
            try:
                graph.at_sizes(dict(sizes, **{symbol: candidate})).infer_shapes()
            except GraphError:
                continue
            working.append(candidate)
        if not working:
            hints.append(f"no {symbol} in 1..{limit} works")
        else:
            hints.append(f"{symbol} must be {_describe_sizes(working, limit)}")
    if any(" must be " in hint for hint in hints):  # say only what would help
        hints = [hint for hint in hints if " must be " in hint]
    others = " with the other sizes as given" if len(sizes) > 1 else ""
    return f"{'; '.join(where)}: {error}; so {', '.join(hints)}{others}"


def _describe_sizes(values, limit):
    """'28', 'one of 28..31', 'at least 3', 'one of 8, 16, 24, ...' for a sorted list of ints found
    among 1..limit (a run reaching `limit` is taken to go on)."""
    runs = []
    for value in values:
        if runs and runs[-1][1] == value - 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    if len(runs) == 1 and runs[0][1] == limit:
        return f"at least {runs[0][0]}"
    if len(values) == 1:
        return str(values[0])
    text = [str(a) if a == b else f"{a} or more" if b == limit else f"{a}..{b}" for a, b in runs]
    if len(text) > 6:
        text = text[:6] + ["..."]
    return "one of " + ", ".join(text)


def bytes_per_sample(graph, shapes, keep=()):
    """Estimated peak working memory of one sample, in bytes: the largest, over the nodes in order,
    of the float32 tensors alive at that node (graph inputs copied, outputs and `keep` kept to the
    end, others freed after their last use) plus the node's scratch space (`Op.scratch_bytes`)."""
    def size(name):
        return 4 * _attrs.sample_elements(shapes[name])

    last_use = {}
    for index, node in enumerate(graph.nodes):
        for name in node.inputs:
            last_use[name] = index
    kept = set(graph.outputs) | set(keep)
    live = sum(size(info.name) for info in graph.inputs)
    peak = live
    for index, node in enumerate(graph.nodes):
        live += sum(size(name) for name in node.outputs)
        scratch = get_op(node.op, node.name).scratch(node, [shapes[name] for name in node.inputs],
                                                     [shapes[name] for name in node.outputs])
        peak = max(peak, live + scratch)
        live -= sum(size(name) for name in set(node.inputs) if last_use[name] == index and name not in kept)
    return peak


def _available_memory():
    """MemAvailable of /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _bound_kernel(plan, node, batch, buffers, results):
    """`node`'s kernel writing into its planned output buffer (see Session._bound_kernels)."""
    kernel = plan.kernels[node.name]
    op = get_op(node.op, node.name)
    # The step's state (registry.Op.keeps_state), but for an output returned to the caller: a state
    # that held that array would keep the check below from ever seeing it dropped.
    stateful = functools.partial(kernel, state={}) if op.keeps_state else kernel
    name = node.outputs[0]
    slot = plan.buffers.slot_of.get(name)
    shape = (batch,) + tuple(plan.shapes[name][1:])
    if slot is not None:
        out = buffers[slot][:batch * _attrs.sample_elements(shape)].reshape(shape)
        return lambda inputs: stateful(inputs, out=out)
    if name in plan.key[0] and op.memory_kinds(node)[0] == "buffer":
        def run(inputs):
            if name not in results or sys.getrefcount(results[name]) > _HELD_BY_ONE_DICT:
                results[name] = np.empty(shape, dtype=np.float32)
            return kernel(inputs, out=results[name])
        return run
    return stateful


class _BlasThreads:
    """Limits the BLAS that numpy uses (float Conv/Gemm) while any limited run is going on.

    threadpoolctl's limit is process-wide, so runs from several Python threads share it: the
    first run to start saves the original setting, the last to finish restores it, and while
    runs overlap the latest limit applies (thread counts never change results)."""

    lock = threading.Lock()
    active = 0
    original = None  # the libraries' thread counts before the first of the overlapping runs
    libraries = None  # threadpoolctl's controllers of the BLAS libraries loaded

    @classmethod
    @contextlib.contextmanager
    def limit(cls, threads):
        # The libraries' own get/set calls, not ThreadpoolController.limit (which queries every
        # library's version and settings: 20-30 microseconds a run each way, against a few).
        with cls.lock:
            if cls.libraries is None:
                cls.libraries = ThreadpoolController().select(user_api="blas").lib_controllers
            if cls.active == 0:
                cls.original = [library.get_num_threads() for library in cls.libraries]
            for library in cls.libraries:
                library.set_num_threads(threads)
            cls.active += 1
        try:
            yield
        finally:
            with cls.lock:
                cls.active -= 1
                if cls.active == 0:
                    for library, count in zip(cls.libraries, cls.original):
                        library.set_num_threads(count)


def _reset_after_fork():
    """In a forked child: the process-wide locks and BLAS-limit state made anew."""
    global _WORKQUEUE_LOCK
    _WORKQUEUE_LOCK = threading.Lock()
    _BlasThreads.lock = threading.Lock()
    _BlasThreads.active = 0
    _BlasThreads.original = None
    _BlasThreads.libraries = None


os.register_at_fork(after_in_child=_reset_after_fork)


def _serialize_if_workqueue():
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: the layer is not chosen
        return _WORKQUEUE_LOCK
    return _WORKQUEUE_LOCK if layer == "workqueue" else contextlib.nullcontext()


def load(path, threads=None, amx=None):
    """Load a .pab file and return a Session for it (raises FormatError on a bad file); threads and
    amx as for Session."""
    return Session(load_graph(path), threads=threads, amx=amx)
