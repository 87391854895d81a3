"""`pabnn bench`: pabnn vs ONNX Runtime float32 vs a popcount roofline loop, side by side.

Networks are built in code with random weights: a single 3x3 conv 256->256 at 56x56 (float in
and out, the conv binarized) and a ResNet-18-shaped network at 1x3x224x224 (every conv but the
first binarized; the classifier stays float). For each PA configuration and thread count the
three are timed in alternation in one process, and medians are reported:

- latency of pabnn and of ONNX Runtime (float32, same architecture, from the source ONNX);
- achieved binary MACs/s per core in the binary layers vs the roofline loop (the register-blocked
  AND+popcount micro-kernel on L1-resident data, one thread): the yardstick;
- a per-layer profile (time, BOPs, FLOPs, share of the total);
- pabnn's runs in a row (warm caches) and the time outside the ops.

Why a pabnn run alternating with the others takes longer than the same run repeated in a row
(the single 3x3 conv at PA(1,1): 5 ms in the table against 3 ms for ten runs in a row, before
Session.run stopped copying the input and allocating the output): ONNX Runtime's run in between
evicts pabnn's data from L1/L2 (its input, packed weights, output and bit-planes all come from
L3 or memory again), numba's worker threads have gone to sleep (at 2 threads), and
Session.run then copied the 3.2 MB input (cold) and wrote a newly allocated 3.2 MB output
(page faults). The last two are gone (a float32 C-contiguous feed is read in place; the output
array of the previous run is reused once the caller dropped it); the cold caches are what a
single inference meets in an application, and ONNX Runtime meets them too.
"""
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


def _converted(network, weight_bases, act_bases, seed=0, act_coding="thermometer", progress=False):
    """(ONNX model, input shape, converted model) of a benchmark network with random weights,
    calibrated on two random inputs. Speed does not depend on the calibration method, so the
    quicker "regression" one is used (the default also chooses each weight's level: about 3x
    the conversion time on ResNet-18)."""
    model, input_shape, binarize = NETWORKS[network](seed)
    calibration = np.random.default_rng(seed).normal(size=(2,) + input_shape[1:]).astype(np.float32)
    converted = convert(model, calibration=calibration, weight_bases=weight_bases, act_bases=act_bases,
                        binarize=binarize, method="regression", act_coding=act_coding, progress=progress)
    return model, input_shape, converted


def bench_case(network, weight_bases, act_bases, threads_list=(1, 2), repeats=10, seed=0, act_coding="thermometer",
               progress=False):
    """One network at one PA configuration (act_coding: the binarized layers' activation code, see
    pabnn.converters.convert): a dict of medians per thread count and a profile. progress: bars
    on stderr (the calibration's layers, then the timed runs)."""
    import onnxruntime

    model, input_shape, converted = _converted(network, weight_bases, act_bases, seed, act_coding, progress)
    rng = np.random.default_rng(seed + 1)
    graph = converted.graph
    feeds = {"input": rng.normal(size=input_shape).astype(np.float32)}
    report = model_report(graph)
    binary_macs = sum(row["bops"] for row in report["layers"])  # batch 1: BOPs of all PA layers
    roofline_macs, roofline = roofline_binary_macs()
    serialized = model.SerializeToString()
    bar = tqdm(total=len(threads_list) * repeats, desc=f"timing {network} PA({weight_bases},{act_bases})", unit="run",
               disable=not progress, leave=False)
    result = {"network": network, "weight_bases": weight_bases, "act_bases": act_bases, "act_coding": act_coding,
              "input_shape": list(input_shape), "bops": report["totals"]["bops"],
              "flops": report["totals"]["flops"], "float_flops": report["totals"]["float_flops"], "threads": []}
    for threads in threads_list:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # ONNX Runtime and numba alternate on the same cores: a pool that spins after its run would
        # take a core from the other one.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        reference = onnxruntime.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
        session = Session(graph, threads=threads)
        result["planned_activation_bytes"] = session.planned_bytes_per_sample()  # the same plan at any thread count
        session.run(None, feeds)
        reference.run(None, feeds)
        samples = {"pabnn": [], "onnxruntime": [], "roofline": []}
        numba.set_num_threads(1)  # the roofline loop is one thread: the per-core yardstick
        for _ in range(repeats):
            samples["onnxruntime"].append(_timed(lambda: reference.run(None, feeds)))
            samples["pabnn"].append(_timed(lambda: session.run(None, feeds)))
            samples["roofline"].append(_timed(roofline))
            bar.update()
        in_a_row = [_timed(lambda: session.run(None, feeds)) for _ in range(repeats)]
        profile = session.profile(feeds, repeats=max(3, repeats // 2))
        # Fused nodes keep the name of their conv, so the report's rows find their time.
        layers = [row for row in report["layers"] if row["name"] in profile]
        binary_seconds = sum(profile[row["name"]] for row in layers if row["bops"])
        medians = {key: float(np.median(values)) for key, values in samples.items()}
        result["threads"].append({
            "threads": threads,
            "pabnn_ms": 1e3 * medians["pabnn"],
            "onnxruntime_ms": 1e3 * medians["onnxruntime"],
            "speedup_vs_onnxruntime": medians["onnxruntime"] / medians["pabnn"],
            "pabnn_in_a_row_ms": 1e3 * float(np.median(in_a_row)),
            "ops_ms": 1e3 * sum(profile.values()),  # medians of each planned node, summed
            "binary_macs_per_s_per_core": binary_macs / binary_seconds / threads if binary_seconds else 0.0,
            "roofline_macs_per_s_per_core": roofline_macs / medians["roofline"],
            "profile": [{"name": row["name"], "op": row["op"], "kind": row["kind"],
                         "ms": 1e3 * profile[row["name"]], "share": profile[row["name"]] / sum(profile.values()),
                         "bops": row["bops"], "flops": row["flops"]} for row in layers],
        })
    bar.close()
    return result


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
    import os
    import subprocess
    import sys
    import tempfile

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
    lines = [f"{result['network']} {list(result['input_shape'])} PA({result['weight_bases']},{result['act_bases']})"
             f"{coding}: "
             f"BOPs {result['bops'] / 1e9:.2f}G, FLOPs {result['flops'] / 1e9:.3f}G "
             f"(float model {result['float_flops'] / 1e9:.2f}G FLOPs), planned activation buffers "
             f"{result['planned_activation_bytes'] / 2**20:.1f} MiB per sample",
             f"  {'threads':>7s} {'pabnn ms':>9s} {'ORT fp32 ms':>11s} {'speedup':>8s} "
             f"{'binary GMAC/s/core':>18s} {'roofline':>9s} {'of roofline':>11s}"]
    for row in result["threads"]:
        lines.append(f"  {row['threads']:7d} {row['pabnn_ms']:9.2f} {row['onnxruntime_ms']:11.2f} "
                     f"{row['speedup_vs_onnxruntime']:7.2f}x {row['binary_macs_per_s_per_core'] / 1e9:18.0f} "
                     f"{row['roofline_macs_per_s_per_core'] / 1e9:9.0f} "
                     f"{row['binary_macs_per_s_per_core'] / row['roofline_macs_per_s_per_core']:10.0%}")
    for row in result["threads"]:
        outside = row["pabnn_in_a_row_ms"] - row["ops_ms"]
        lines.append(f"  pabnn at {row['threads']} thread(s): {row['pabnn_ms']:.2f} ms alternating with ORT and the "
                     f"roofline (cold caches), {row['pabnn_in_a_row_ms']:.2f} ms in a row; the ops alone "
                     f"{row['ops_ms']:.2f} ms, outside them {outside:.2f} ms "
                     f"({outside / row['pabnn_in_a_row_ms']:.0%} of a run in a row)")
    first = result["threads"][0]
    lines.append(f"  per-layer profile at {first['threads']} thread(s), top {top_layers} by time:")
    for layer in sorted(first["profile"], key=lambda layer: -layer["ms"])[:top_layers]:
        lines.append(f"    {layer['name'][:34]:34s} {layer['op']:17s} {layer['kind']:8s} {layer['ms']:8.2f} ms "
                     f"{layer['share']:6.1%}  BOPs {layer['bops'] / 1e6:9.1f}M  FLOPs {layer['flops'] / 1e6:8.2f}M")
    return "\n".join(lines)
