"""`pabnn bench`: pabnn vs ONNX Runtime float32 vs a popcount roofline loop, side by side.

Networks are built in code with random weights: a single 3x3 conv 256->256 at 56x56 (float in
and out, the conv binarized) and a ResNet-18-shaped network at 1x3x224x224 (every conv but the
first binarized; the classifier stays float). For each PA configuration and thread count the
three are timed in alternation in one process, and medians are reported:

- latency of pabnn and of ONNX Runtime (float32, same architecture, from the source ONNX);
- achieved binary MACs/s per core in the binary layers vs the roofline loop (the register-blocked
  AND+popcount micro-kernel on L1-resident data, one thread): the yardstick; also per output map
  size (ResNet-18: 56x56, 28x28, 14x14, 7x7), from the per-node profile in the run;
- a per-layer profile (time, BOPs, FLOPs, share of the total);
- pabnn's runs in a row (warm caches: after IN_A_ROW_WARMUP untimed runs, as OpenVINO's script
  times its own) and the time outside the ops;
- CPU time (of the process) of pabnn and ONNX Runtime, alternating and in a row: at 1 thread it
  leaves out the time spent waiting for a core on a shared machine; and the load average;
- with an OpenVinoPeer (`pabnn bench --openvino-python`): OpenVINO's binary engine on the same
  network's binary twin (Bi-Real-18 for resnet18, the binary 3x3 conv 256->256 @56 for conv3x3),
  run by ../shared/peers/bench_ov.py in OpenVINO's own venv, one run per round, the rounds
  alternating with pabnn's (pabnn never imports openvino).

Why a pabnn run alternating with the others takes longer than the same run repeated in a row
(the single 3x3 conv at PA(1,1): 5 ms in the table against 3 ms for ten runs in a row, before
Session.run stopped copying the input and allocating the output): ONNX Runtime's run in between
evicts pabnn's data from the caches (its input, output, packed weights and bit-planes come from
farther away again), and Session.run then copied the 3.2 MB input (cold) and
wrote a newly allocated 3.2 MB output (page faults). The last two are gone (a float32
C-contiguous feed is read in place; the output array of the previous run is reused once the
caller dropped it). The cold caches remain and were measured again (benchmarks/cold_runs.py,
docs/benchmarks.md; on a quiet machine, 1 thread): 4.80 ms alternating against 3.45 ms in a row,
the same in CPU time, so it is work, not waiting for a core. It is not the clock (a scalar loop
runs at the same speed after ONNX Runtime's run) nor L1/L2 alone (writing 1 MiB costs nothing):
the conv's 6.4 MB of input and output live in L3, and whatever evicts them from there (ONNX
Runtime's run, a 64 MiB write, other processes while pabnn sleeps) costs 1.0-1.8 ms of the next
run, fading over 3-4 runs rather than one. That is what a single inference meets in an
application, and ONNX Runtime and OpenVINO are timed the same way, so the table keeps measuring
it. On a machine shared with other jobs the wall-clock medians also include waits for a core:
compare the CPU times printed beside them.
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numba
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from tqdm.auto import tqdm

from pabnn.engine.jit import jit
from pabnn.engine.popcount_block import CHANNELS, PIXELS, popcount_block
from pabnn.engine.report import model_report
from pabnn.engine.session import Session

from .convert import convert


class _OnnxBuilder:
    """Tiny helper that appends Conv/BatchNorm/Relu/... nodes with random weights."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.initializers = [], []

    def _constant(self, name, array):
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def node(self, op, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x, cin, cout, kernel, stride, name, bias=False):
        fan_in = cin * kernel * kernel
        weight = self._constant(f"{name}.w", self.rng.normal(0, np.sqrt(2 / fan_in), (cout, cin, kernel, kernel)))
        inputs = [x, weight] + ([self._constant(f"{name}.b", self.rng.normal(0, 0.1, cout))] if bias else [])
        return self.node("Conv", inputs, name, kernel_shape=[kernel, kernel], strides=[stride, stride],
                         pads=[kernel // 2] * 4)

    def batchnorm(self, x, channels, name):
        parameters = [self._constant(f"{name}.{key}", value) for key, value in (
            ("scale", self.rng.uniform(0.5, 1.5, channels)), ("bias", self.rng.normal(0, 0.1, channels)),
            ("mean", self.rng.normal(0, 0.1, channels)), ("var", self.rng.uniform(0.5, 1.5, channels)))]
        return self.node("BatchNormalization", [x] + parameters, name)

    def model(self, input_shape, output):
        graph = helper.make_graph(
            self.nodes, "bench", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_shape[1:]])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv3x3_network(seed=0):
    """One 3x3 conv 256->256 at 56x56 with bias: (ONNX model, input shape, layers to binarize)."""
    builder = _OnnxBuilder(seed)
    output = builder.conv("input", 256, 256, 3, 1, "conv", bias=True)
    return builder.model((1, 256, 56, 56), output), (1, 256, 56, 56), ["conv"]


def resnet18_network(seed=0):
    """ResNet-18 (BatchNorm, basic blocks, 1x1 downsampling shortcuts) at 224x224, 1000 classes."""
    b = _OnnxBuilder(seed)
    x = b.node("Relu", [b.batchnorm(b.conv("input", 3, 64, 7, 2, "conv1"), 64, "bn1")], "relu1")
    x = b.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    channels = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            name = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            y = b.node("Relu", [b.batchnorm(b.conv(x, channels, width, 3, stride, f"{name}.conv1"), width,
                                            f"{name}.bn1")], f"{name}.relu1")
            y = b.batchnorm(b.conv(y, width, width, 3, 1, f"{name}.conv2"), width, f"{name}.bn2")
            shortcut = x
            if stride != 1 or channels != width:
                shortcut = b.batchnorm(b.conv(x, channels, width, 1, stride, f"{name}.downsample"), width,
                                       f"{name}.downsample.bn")
            x = b.node("Relu", [b.node("Add", [y, shortcut], f"{name}.add")], f"{name}.relu2")
            channels = width
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "avgpool")], "flatten")
    weight = b._constant("fc.w", b.rng.normal(0, 0.05, (1000, 512)))
    output = b.node("Gemm", [x, weight, b._constant("fc.b", np.zeros(1000))], "fc", transB=1)
    return b.model((1, 3, 224, 224), output), (1, 3, 224, 224), None


NETWORKS = {"conv3x3": conv3x3_network, "resnet18": resnet18_network}


@jit
def _roofline_loop(windows, weights, length, scales, result, repeats):
    for _ in range(repeats):
        popcount_block(windows, 0, PIXELS, weights, 0, length, scales, 0, result, 0, PIXELS, True)
    return result[0]


def roofline_binary_macs(repeats=3000, length=256):
    """(binary MACs per call of the loop, callable running it): the micro-kernel on L1-resident data."""
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 2**63, PIXELS * length, dtype=np.uint64)
    weights = rng.integers(0, 2**63, CHANNELS * length, dtype=np.uint64)
    scales = np.ones(CHANNELS)
    result = np.zeros(CHANNELS * PIXELS)
    arguments = (windows, weights, length, scales, result)
    _roofline_loop(*arguments, 1)
    return repeats * PIXELS * CHANNELS * length * 64, lambda: _roofline_loop(*arguments, repeats)


def _timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _by_layer(session, profile):
    """{stored node name: seconds} from a profile of the planned nodes: a fused node keeps the name of
    its conv, and a plan-only step (a PackPlanes) counts for the layer it packs for (PlanNode.source)."""
    layers = {}
    for node in session.plan_graph().nodes:
        name = getattr(node, "source", None) or node.name
        layers[name] = layers.get(name, 0.0) + profile[node.name]
    return layers


def _timed_with_cpu(function):
    """(wall seconds, CPU seconds of this process) of one call."""
    start, start_cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - start, time.process_time() - start_cpu


# OpenVINO's binary models beside each benchmark network (../shared/peers/bench_ov.py): the first
# is the one the table compares with; for the single conv the script's two chained binary convs
# are timed too (the second reads packed bits, so _x2 - _x1 is what a conv costs inside a network).
# Untimed runs before the timed runs in a row, for pabnn and for OpenVINO's script alike.
IN_A_ROW_WARMUP = 5
OPENVINO_MODELS = {"conv3x3": ("bconv256x256_56", "bconv256x256_56_x2"), "resnet18": ("birealnet",)}
OPENVINO_DESCRIPTIONS = {
    "bconv256x256_56": "binary 3x3 conv 256->256 @56 (sign in, float out)",
    "bconv256x256_56_x2": "two chained binary 3x3 convs 256->256 @56",
    "birealnet": "Bi-Real-18 (float 7x7 stem and FC, 16 binary 3x3 convs, float 1x1 downsampling)",
}


def default_openvino_script():
    """../shared/peers/bench_ov.py next to the repository this module is in, or None."""
    path = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "bench_ov.py"
    return str(path) if path.is_file() else None


class PeerError(Exception):
    """The OpenVINO peer could not be run or its output could not be read."""


class OpenVinoPeer:
    """OpenVINO's CPU plugin as a peer, measured by `script` (../shared/peers/bench_ov.py) in a
    subprocess run by `python` (the interpreter of a venv holding openvino; pabnn never imports
    it). Each round() is one run of the script: it builds its models with random weights, checks
    them against its own references and times them at each thread count (f32, latency hint).
    After the first failure the peer stays off and `error` says why, in one line."""

    def __init__(self, python, script, timeout=900):
        self.python, self.script, self.timeout = python, script, timeout
        self.error = None
        if not python or not os.path.isfile(python) or not os.access(python, os.X_OK):
            self.error = f"the Python interpreter {python!r} does not exist or is not executable"
        elif not script or not os.path.isfile(script):
            self.error = (f"the peer script {script!r} does not exist (give --openvino-script, usually "
                          f"../shared/peers/bench_ov.py)")

    def round(self, models, threads_list, runs, warmup=IN_A_ROW_WARMUP):
        """{model: {threads: the script's result record (median_ms, min_ms, p90_ms, foreign_cores,
        ...)}} of one run of the script, or None once the peer has failed (self.error)."""
        if self.error:
            return None
        try:
            return self._round(models, threads_list, runs, warmup)
        except PeerError as error:
            self.error = str(error)
            return None

    def _round(self, models, threads_list, runs, warmup):
        with tempfile.TemporaryDirectory(prefix="pabnn-openvino-") as folder:
            output = os.path.join(folder, "results_ov.json")
            command = [self.python, self.script, "--models", *models, "--threads", *map(str, threads_list),
                       "--rounds", "1", "--runs", str(runs), "--warmup", str(warmup), "--no-bf16",
                       "--profile-runs", "0", "--json", output]
            try:
                finished = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise PeerError(f"{self.script} did not finish within {self.timeout} s") from None
            except OSError as error:
                raise PeerError(f"cannot start {self.python}: {error.strerror or error}") from None
            if finished.returncode != 0:
                lines = (finished.stderr or finished.stdout).strip().splitlines()
                raise PeerError(f"{self.script} exited with code {finished.returncode}: "
                                f"{lines[-1] if lines else 'no output'}")
            try:
                with open(output) as handle:
                    records = json.load(handle)["results"]
                table = {}
                for record in records:
                    table.setdefault(record["model"], {})[int(record["threads"])] = record
                for model in models:
                    for threads in threads_list:
                        float(table[model][threads]["median_ms"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise PeerError(f"{self.script} wrote no result for every model and thread count in {output} "
                                f"({type(error).__name__}: {error})") from None
            return table


def _converted(network, weight_bases, act_bases, seed=0, act_coding="thermometer", progress=False, integer=None):
    """(ONNX model, input shape, converted model) of a benchmark network with random weights,
    calibrated on two random inputs. Speed does not depend on the calibration method, so the
    quicker "regression" one is used (the default also chooses each weight's level: about 3x
    the conversion time on ResNet-18). integer: layers to run as 8-bit integer layers (convert's
    `integer`)."""
    model, input_shape, binarize = NETWORKS[network](seed)
    calibration = np.random.default_rng(seed).normal(size=(2,) + input_shape[1:]).astype(np.float32)
    converted = convert(model, calibration=calibration, weight_bases=weight_bases, act_bases=act_bases,
                        binarize=binarize, method="regression", act_coding=act_coding, integer=integer,
                        progress=progress)
    return model, input_shape, converted


def bench_case(network, weight_bases, act_bases, threads_list=(1, 2), repeats=10, seed=0, act_coding="thermometer",
               openvino=None, rounds=1, progress=False, integer=None, amx=None):
    """One network at one PA configuration (act_coding: the binarized layers' activation code;
    integer: layers run as 8-bit integer layers; see pabnn.converters.convert; amx: the Session's
    option, engine/session.py): a dict of medians per thread count and a profile.

    Each of `rounds` rounds times, per thread count, `repeats` alternations of ONNX Runtime,
    pabnn and the roofline loop and then `repeats` pabnn runs in a row, then (with `openvino`, an
    OpenVinoPeer) one run of OpenVINO's binary model of this network in its subprocess at every
    thread count (`repeats` runs in a row after IN_A_ROW_WARMUP of warm-up, as pabnn's runs in a
    row), so the engines share the machine's state of that minute. Medians pool the rounds' runs; OpenVINO's is the median of its rounds'
    medians, and so is the per-node profile's (`Session.profile` after each round's runs in a row). ONNX Runtime is compared with pabnn's alternating runs (both as cold), OpenVINO with
    pabnn's runs in a row (both warm: caches, and threads that have not gone to sleep). progress: bars on stderr (the
    calibration's layers, then the timed runs)."""
    import onnxruntime

    model, input_shape, converted = _converted(network, weight_bases, act_bases, seed, act_coding, progress, integer)
    rng = np.random.default_rng(seed + 1)
    graph = converted.graph
    feeds = {"input": rng.normal(size=input_shape).astype(np.float32)}
    report = model_report(graph)
    binary_macs = sum(row["bops"] for row in report["layers"])  # batch 1: BOPs of all PA layers
    roofline_macs, roofline = roofline_binary_macs()
    serialized = model.SerializeToString()
    bar = tqdm(total=rounds * len(threads_list) * repeats, desc=f"timing {network} PA({weight_bases},{act_bases})", unit="run",
               disable=not progress, leave=False)
    result = {"network": network, "weight_bases": weight_bases, "act_bases": act_bases, "act_coding": act_coding,
              "integer_layers": [layer["layer"] for layer in graph.metadata["converter"]["integer"]],
              "input_shape": list(input_shape), "bops": report["totals"]["bops"],
              "flops": report["totals"]["flops"], "float_flops": report["totals"]["float_flops"], "threads": [],
              "rounds": rounds, "load_average": [os.getloadavg()[0]]}
    engines = {}
    for threads in threads_list:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # ONNX Runtime and numba alternate on the same cores: a pool that spins after its run would
        # take a core from the other one.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        reference = onnxruntime.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
        session = Session(graph, threads=threads, amx=amx)
        result["planned_activation_bytes"] = session.planned_bytes_per_sample()  # the same plan at any thread count
        plan_ops = [node.op for node in session.plan_graph().nodes]
        result["amx_layers"] = plan_ops.count("AmxConv")
        result["binary_layers"] = result["amx_layers"] + plan_ops.count("BinaryConv")
        session.run(None, feeds)
        reference.run(None, feeds)
        engines[threads] = (session, reference)
    samples = {threads: {"pabnn": [], "onnxruntime": [], "roofline": [], "pabnn_cpu": [], "onnxruntime_cpu": [],
                         "pabnn_in_a_row": [], "pabnn_in_a_row_cpu": []} for threads in threads_list}
    profiles = {threads: [] for threads in threads_list}  # each round's per-node medians
    openvino_models = OPENVINO_MODELS[network]
    openvino_rounds = []
    for _ in range(rounds):
        for threads in threads_list:
            session, reference = engines[threads]
            numba.set_num_threads(1)  # the roofline loop is one thread: the per-core yardstick
            for _ in range(repeats):
                for engine, function in (("onnxruntime", lambda: reference.run(None, feeds)),
                                         ("pabnn", lambda: session.run(None, feeds))):
                    wall, cpu = _timed_with_cpu(function)
                    samples[threads][engine].append(wall)
                    samples[threads][f"{engine}_cpu"].append(cpu)
                samples[threads]["roofline"].append(_timed(roofline))
                bar.update()
            # Then runs in a row, as OpenVINO's script times its own: the same untimed warm-up
            # runs first, then warm caches and busy threads.
            for _ in range(IN_A_ROW_WARMUP):
                session.run(None, feeds)
            for _ in range(repeats):
                wall, cpu = _timed_with_cpu(lambda: session.run(None, feeds))
                samples[threads]["pabnn_in_a_row"].append(wall)
                samples[threads]["pabnn_in_a_row_cpu"].append(cpu)
            # The per-node profile right after (warm, like the runs in a row), in every round: a
            # minute in which another job holds a core then moves one round's medians, not all.
            profiles[threads].append(session.profile(feeds, repeats=max(3, repeats // 2)))
        if openvino is not None:
            measured = openvino.round(openvino_models, threads_list, repeats)
            if measured is not None:
                openvino_rounds.append(measured)
        result["load_average"].append(os.getloadavg()[0])
    if openvino is not None:
        result["openvino"] = {"models": list(openvino_models), "error": openvino.error}
    for threads in threads_list:
        session, _ = engines[threads]
        pooled = {name: float(np.median([round_profile[name] for round_profile in profiles[threads]]))
                  for name in profiles[threads][0]}
        profile = _by_layer(session, pooled)
        layers = [row for row in report["layers"] if row["name"] in profile]
        binary_seconds = sum(profile[row["name"]] for row in layers if row["bops"])
        medians = {key: float(np.median(values)) for key, values in samples[threads].items()}
        row = {
            "threads": threads,
            "pabnn_ms": 1e3 * medians["pabnn"],
            "onnxruntime_ms": 1e3 * medians["onnxruntime"],
            "speedup_vs_onnxruntime": medians["onnxruntime"] / medians["pabnn"],
            # process CPU time: at 1 thread it leaves out the waits for a core on a shared machine
            "pabnn_cpu_ms": 1e3 * medians["pabnn_cpu"],
            "onnxruntime_cpu_ms": 1e3 * medians["onnxruntime_cpu"],
            "pabnn_in_a_row_ms": 1e3 * medians["pabnn_in_a_row"],
            "pabnn_in_a_row_cpu_ms": 1e3 * medians["pabnn_in_a_row_cpu"],
            "ops_ms": 1e3 * sum(profile.values()),  # medians of each planned node, summed
            "binary_macs_per_s_per_core": binary_macs / binary_seconds / threads if binary_seconds else 0.0,
            "roofline_macs_per_s_per_core": roofline_macs / medians["roofline"],
            "profile": [{"name": row["name"], "op": row["op"], "kind": row["kind"],
                         "ms": 1e3 * profile[row["name"]], "share": profile[row["name"]] / sum(profile.values()),
                         "bops": row["bops"], "flops": row["flops"]} for row in layers],
            "binary_by_map": _binary_by_map(layers, profile, threads, roofline_macs / medians["roofline"]),
        }
        if openvino_rounds and not openvino.error:  # a peer that failed in a later round is left out whole
            row["openvino"] = {}
            for name in openvino_models:
                records = [measured[name][threads] for measured in openvino_rounds]
                row["openvino"][name] = {
                    "median_ms": float(np.median([record["median_ms"] for record in records])),
                    "round_medians_ms": [record["median_ms"] for record in records],
                    "min_ms": min(record["min_ms"] for record in records),
                    "foreign_cores": [record.get("foreign_cores") for record in records]}
            row["openvino_ms"] = row["openvino"][openvino_models[0]]["median_ms"]
            # Like with like: OpenVINO's script times runs in a row, so pabnn's runs in a row.
            row["speedup_vs_openvino"] = row["openvino_ms"] / row["pabnn_in_a_row_ms"]
        result["threads"].append(row)
    bar.close()
    return result


def _binary_by_map(layers, profile, threads, roofline):
    """[{"map": "HxW", "layers", "ms", "macs_per_s_per_core", "of_roofline"}] of the binary layers
    grouped by output map size, largest first: their binary MACs over their profiled time (in a
    run, per core) against the roofline loop's rate (`roofline`, MACs/s on one core)."""
    groups = {}
    for row in layers:
        if row["bops"]:
            height, width = row["output_shape"][-2:]
            macs, seconds, count = groups.get((height, width), (0, 0.0, 0))
            groups[height, width] = (macs + row["bops"], seconds + profile[row["name"]], count + 1)
    largest_first = sorted(groups.items(), key=lambda item: -item[0][0] * item[0][1])
    return [{"map": f"{height}x{width}", "layers": count, "ms": 1e3 * seconds,
             "macs_per_s_per_core": macs / seconds / threads, "of_roofline": macs / seconds / threads / roofline}
            for (height, width), (macs, seconds, count) in largest_first if seconds > 0]


_STARTUP_SCRIPT = """
import time
start = time.perf_counter()
import numpy as np
from pabnn.engine import load
session = load({path!r})
session.run(None, {{session.input_names[0]: np.zeros({shape!r}, np.float32)}})
print(time.perf_counter() - start)
"""


def startup_seconds(network="resnet18", weight_bases=1, act_bases=1, runs=3, progress=False):
    """Median seconds of (import pabnn.engine, load the .pab, first inference) in a new process,
    cold (an empty numba cache, so every kernel compiles) and warm (the cache filled by the
    cold run). Returns {"cold": s, "warm": s}. progress: bars on stderr."""
    _, input_shape, converted = _converted(network, weight_bases, act_bases, progress=progress)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{network}.pab")
        converted.save(path)
        script = _STARTUP_SCRIPT.format(path=path, shape=tuple(input_shape))
        times = {"cold": [], "warm": []}
        for _ in tqdm(range(runs), desc="new processes, cold and warm", unit="pair", disable=not progress, leave=False):
            environment = dict(os.environ, NUMBA_CACHE_DIR=tempfile.mkdtemp(dir=folder))
            for kind in ("cold", "warm"):
                output = subprocess.run([sys.executable, "-c", script], env=environment, check=True,
                                        capture_output=True, text=True).stdout
                times[kind].append(float(output.split()[-1]))
    return {kind: float(np.median(values)) for kind, values in times.items()}


def format_case(result, top_layers=8):
    coding = " binary-coded activations" if result.get("act_coding") == "binary" else ""
    if result.get("integer_layers"):
        coding += f", int8 {', '.join(result['integer_layers'])}"
    openvino = result.get("openvino")
    with_openvino = bool(result["threads"]) and "openvino_ms" in result["threads"][0]
    load = result.get("load_average")
    lines = [f"{result['network']} {list(result['input_shape'])} PA({result['weight_bases']},{result['act_bases']})"
             f"{coding}: "
             f"BOPs {result['bops'] / 1e9:.2f}G, FLOPs {result['flops'] / 1e9:.3f}G "
             f"(float model {result['float_flops'] / 1e9:.2f}G FLOPs), planned activation buffers "
             f"{result['planned_activation_bytes'] / 2**20:.1f} MiB per sample"
             + (f"; AMX-INT8 tiles for {result['amx_layers']} of {result['binary_layers']} binary layers"
                if result.get("amx_layers") else "")
             + (f"; load average {min(load):.1f}-{max(load):.1f}" if load else "")]
    if openvino and openvino.get("error"):
        lines.append(f"  OpenVINO peer: {openvino['error']}; its column is left out")
    elif with_openvino:
        name = openvino["models"][0]
        lines.append(f"  OpenVINO binary ({name}): {OPENVINO_DESCRIPTIONS.get(name, name)}; median of "
                     f"{result.get('rounds', 1)} rounds alternating with pabnn's")
    lines.append(f"  {'threads':>7s} {'pabnn ms':>9s} {'ORT fp32 ms':>11s} {'speedup':>8s} "
                 + (f"{'in a row ms':>11s} {'OV binary ms':>12s} {'vs OV':>6s} " if with_openvino else "")
                 + f"{'binary GMAC/s/core':>18s} {'roofline':>9s} {'of roofline':>11s}")
    for row in result["threads"]:
        lines.append(f"  {row['threads']:7d} {row['pabnn_ms']:9.2f} {row['onnxruntime_ms']:11.2f} "
                     f"{row['speedup_vs_onnxruntime']:7.2f}x "
                     + (f"{row['pabnn_in_a_row_ms']:11.2f} {row['openvino_ms']:12.2f} "
                        f"{row['speedup_vs_openvino']:5.2f}x " if with_openvino else "")
                     + f"{row['binary_macs_per_s_per_core'] / 1e9:18.0f} "
                     f"{row['roofline_macs_per_s_per_core'] / 1e9:9.0f} "
                     f"{row['binary_macs_per_s_per_core'] / row['roofline_macs_per_s_per_core']:10.0%}")
    for row in result["threads"]:
        outside = row["pabnn_in_a_row_ms"] - row["ops_ms"]
        lines.append(f"  pabnn at {row['threads']} thread(s): {row['pabnn_ms']:.2f} ms alternating with ORT and the "
                     f"roofline (cold caches), {row['pabnn_in_a_row_ms']:.2f} ms in a row; the ops alone "
                     f"{row['ops_ms']:.2f} ms, outside them {outside:.2f} ms "
                     f"({outside / row['pabnn_in_a_row_ms']:.0%} of a run in a row)"
                     + (f"; CPU time {row['pabnn_cpu_ms']:.2f} ms alternating, {row['pabnn_in_a_row_cpu_ms']:.2f} ms "
                        f"in a row (ORT {row['onnxruntime_cpu_ms']:.2f} ms)" if "pabnn_cpu_ms" in row else ""))
        if row.get("binary_by_map"):
            groups = ", ".join(f"{group['map']} {group['of_roofline']:.0%} ({group['layers']} layers, "
                               f"{group['ms']:.2f} ms)" for group in row["binary_by_map"])
            lines.append(f"  binary layers at {row['threads']} thread(s) by output map, of the roofline per core: "
                         f"{groups}")
        if with_openvino and len(row["openvino"]) > 1:
            single, chained = (row["openvino"][name]["median_ms"] for name in openvino["models"][:2])
            lines.append(f"  OpenVINO at {row['threads']} thread(s): {chained:.2f} ms for two chained convs, so "
                         f"{chained - single:.2f} ms for the second (packed bits in, no float input to binarize)")
    first = result["threads"][0]
    lines.append(f"  per-layer profile at {first['threads']} thread(s), top {top_layers} by time:")
    for layer in sorted(first["profile"], key=lambda layer: -layer["ms"])[:top_layers]:
        lines.append(f"    {layer['name'][:34]:34s} {layer['op']:17s} {layer['kind']:8s} {layer['ms']:8.2f} ms "
                     f"{layer['share']:6.1%}  BOPs {layer['bops'] / 1e6:9.1f}M  FLOPs {layer['flops'] / 1e6:8.2f}M")
    return "\n".join(lines)


def format_summary(results):
    """A markdown table of every case: network | threads | pabnn | ONNX Runtime | OpenVINO | ratios."""
    lines = ["| network | threads | pabnn ms | ONNX Runtime fp32 ms | ORT / pabnn | pabnn in a row ms | "
             "OpenVINO binary ms | OpenVINO / pabnn in a row |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        coding = ", binary-coded" if result.get("act_coding") == "binary" else ""
        name = f"{result['network']} PA({result['weight_bases']},{result['act_bases']}{coding})"
        openvino = result.get("openvino") or {}
        for index, row in enumerate(result["threads"]):
            if "openvino_ms" in row:
                peer = f"{row['openvino_ms']:.2f} ({openvino['models'][0]})", f"{row['speedup_vs_openvino']:.2f}x"
            else:
                peer = ("-", "-")
            lines.append(f"| {name if index == 0 else ''} | {row['threads']} | {row['pabnn_ms']:.2f} | "
                         f"{row['onnxruntime_ms']:.2f} | {row['speedup_vs_onnxruntime']:.2f}x | "
                         f"{row['pabnn_in_a_row_ms']:.2f} | {peer[0]} | {peer[1]} |")
    return "\n".join(lines)
