"""Float Conv: pabnn's kernel vs ONNX Runtime vs numpy's BLAS (sgemm) on the im2col matrix.

For each conv shape and thread count, timed in alternation in one process (medians of
--repeats runs):

- pabnn: the Conv op's kernel writing into a preallocated output (numba threads = threads, the
  BLAS held to one thread, as inside `Session.run`);
- ONNX Runtime: a one-node ONNX model of the same conv (float32, same weights and bias);
- im2col (convs that run the direct or pointwise kernel, `conv.uses_direct` and
  `conv.uses_pointwise`): the same conv as im2col + GEMM, the path it would take otherwise, timed
  the same way;
- sgemm: numpy's matmul of the weights [out_channels x K] by a prebuilt im2col matrix
  [K x pixels] (K = in_channels * kh * kw), the BLAS at `threads` threads: the rate a conv that
  spent no time outside the GEMM would reach. "of sgemm" is pabnn's MAC rate over this rate.

The 3x3 stride-1 convs with 16 or more input channels run as Winograd F(2x2, 3x3) (2.25x fewer
multiplications than the im2col GEMM), so their "of sgemm" can exceed 100%. "best" is the ratio of
the fastest runs: on a machine shared with other jobs the medians of multi-millisecond runs
include preemptions, the fastest runs much less so. "CPU" (convs at 1 thread only) is the ratio of the median CPU time
of the calling thread (time.thread_time), where both engines run a conv's work at 1 thread: it
leaves out the time the thread waited for a core. (numba's parallel kernels, the max-pool's,
may run on a worker thread, so the pool has no such column.)

    python benchmarks/float_conv.py [--repeats 30] [--threads 1 2] [--shapes stem small-K maxpool]

OpenBLAS's worker threads spin for a long time after each multi-threaded call (the sgemm yardstick
at 2 threads), on the very cores the next engine runs on: measured here, pabnn's 3x3 256->256 conv
at 2 threads took 21.1 ms right after such a call and 11.0 ms without one, and ONNX Runtime ran at
its 1-thread speed. So the script sets OPENBLAS_THREAD_TIMEOUT=4 (the shortest spin OpenBLAS
allows; it reads it when it loads) unless the environment sets it.
"""
import argparse
import os
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before numpy loads OpenBLAS (see above)

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from pabnn.engine.graph import Node
from pabnn.engine.ops import get_op
from pabnn.engine.ops import conv
from pabnn.engine.ops.conv import window_view

# name, in_channels, out_channels, kernel, stride, pad, input size (batch 1, square)[, group]
SHAPES = [
    ("stem 7x7/2 3->64 @224", 3, 64, 7, 2, 3, 224),
    ("3x3 64->64 @56", 64, 64, 3, 1, 1, 56),
    ("3x3 256->256 @56", 256, 256, 3, 1, 1, 56),
    ("3x3/2 128->256 @56", 128, 256, 3, 2, 1, 56),
    ("1x1 256->1024 @14", 256, 1024, 1, 1, 0, 14),
    ("1x1 512->2048 @7", 512, 2048, 1, 1, 0, 7),
    ("1x1/2 64->128 @56", 64, 128, 1, 2, 0, 56),
    # few taps per output (K = C * kh * kw): where the direct kernel (see conv.uses_direct) and im2col
    # + GEMM were compared; the 1x1 ones run the pointwise kernel (conv.uses_pointwise)
    ("small-K 3x3 3->32 @224", 3, 32, 3, 1, 1, 224),
    ("small-K 5x5/2 4->48 @128", 4, 48, 5, 2, 2, 128),
    ("small-K 3x3/2 16->32 @112", 16, 32, 3, 2, 1, 112),
    ("small-K 1x1 64->256 @56", 64, 256, 1, 1, 0, 56),
    ("small-K 1x1 128->128 @28", 128, 128, 1, 1, 0, 28),
    ("small-K 3x3/2 32->64 @56", 32, 64, 3, 2, 1, 56),
    # depthwise (group = channels, the 8th field): MobileNet-style blocks
    ("depthwise 3x3 96 @56", 96, 96, 3, 1, 1, 56, 96),
    ("depthwise 3x3/2 96 @56", 96, 96, 3, 2, 1, 56, 96),
    ("depthwise 5x5/2 144 @28", 144, 144, 5, 2, 2, 28, 144),
    ("depthwise 3x3 384 @14", 384, 384, 3, 1, 1, 14, 384),
    ("small-K 3x3/2 64->128 @56", 64, 128, 3, 2, 1, 56),
]
_CONTROLLER = ThreadpoolController()
# The max-pool after the stem (3x3/2, pad 1, 64 channels at 112x112), timed the same way.
POOL = ("maxpool 3x3/2 64 @112", 64, 112)


def onnx_conv_session(weight, bias, stride, pad, threads, group=1):
    """ONNX Runtime float32 session of one Conv (x -> y) at `threads` intra-op threads, no spinning."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(weight.shape[2:]),
                            strides=[stride, stride], pads=[pad] * 4, group=group)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # The engines alternate on the same cores: a pool spinning after its run would take a core.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _timed(function, cpu=None):
    """Wall seconds of function(); with a list `cpu`, also appends the calling thread's CPU seconds."""
    start, start_cpu = time.perf_counter(), time.thread_time()
    function()
    elapsed = time.perf_counter() - start
    if cpu is not None:
        cpu.append(time.thread_time() - start_cpu)
    return elapsed


def bench_shape(shape, threads, repeats, seed=0):
    name, in_channels, out_channels, kernel, stride, pad, size = shape[:7]
    group = shape[7] if len(shape) > 7 else 1
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, np.sqrt(2 / (in_channels // group * kernel * kernel)),
                        (out_channels, in_channels // group, kernel, kernel)).astype(np.float32)
    bias = rng.normal(0, 0.1, out_channels).astype(np.float32)
    x = rng.normal(size=(1, in_channels, size, size)).astype(np.float32)
    node = Node("Conv", "conv", ["x"], ["y"], {"strides": [stride, stride], "pads": [pad] * 4, "group": group},
                {"weight": weight, "bias": bias})
    op = get_op("Conv")
    (output_shape,) = op.infer_shapes(node, [(None,) + x.shape[1:]])
    out = np.empty((1,) + output_shape[1:], np.float32)
    kernel_run = op.make_kernel(node)
    # Convs that run the direct or pointwise kernel are also timed as im2col + GEMM, their other path.
    direct = conv.uses_direct(node, weight) or conv.uses_pointwise(node, weight)
    im2col_run = conv._make_im2col_kernel(node, weight, bias) if direct else None
    im2col_out = np.empty_like(out)
    # The im2col matrices [group, K, pixels] and the weights [group, out_channels / group, K] for the
    # sgemm yardstick (one GEMM per group).
    windows = window_view(x, (kernel, kernel), (stride, stride), [pad] * 4, (1, 1))
    columns = np.ascontiguousarray(windows[0].reshape(group, in_channels // group * kernel * kernel, -1))
    matrix = np.ascontiguousarray(weight.reshape(group, out_channels // group, -1))
    product = np.empty((group, out_channels // group, columns.shape[2]), np.float32)
    macs = group * matrix.shape[1] * matrix.shape[2] * columns.shape[2]
    session = onnx_conv_session(weight, bias, stride, pad, threads, group)
    feeds = {"x": x}
    expected = session.run(None, feeds)[0]

    def pabnn():
        kernel_run([x], out=out)

    def im2col():
        im2col_run([x], out=im2col_out)

    def sgemm():
        np.matmul(matrix, columns, out=product)

    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        # The BLAS limits are set outside the timed calls (setting one costs tens of microseconds).
        with _CONTROLLER.limit(limits=1, user_api="blas"):
            pabnn()
        with _CONTROLLER.limit(limits=threads, user_api="blas"):
            sgemm()
        error = float(np.max(np.abs(out - expected)) / max(1.0, np.max(np.abs(expected))))
        samples = {"pabnn": [], "onnxruntime": [], "sgemm": [], "im2col": []}
        cpu = {"pabnn": [], "onnxruntime": [], "im2col": []}
        for _ in range(repeats):
            samples["onnxruntime"].append(_timed(lambda: session.run(None, feeds), cpu["onnxruntime"]))
            with _CONTROLLER.limit(limits=1, user_api="blas"):
                samples["pabnn"].append(_timed(pabnn, cpu["pabnn"]))
                if im2col_run is not None:
                    samples["im2col"].append(_timed(im2col, cpu["im2col"]))
            with _CONTROLLER.limit(limits=threads, user_api="blas"):
                samples["sgemm"].append(_timed(sgemm))
    finally:
        numba.set_num_threads(previous)
    medians = {key: float(np.median(values)) if values else None for key, values in samples.items()}
    return {"name": name, "threads": threads, "macs": macs, "error": error,
            "im2col_ms": 1e3 * medians["im2col"] if im2col_run is not None else None,
            "im2col_cpu_ratio": (float(np.median(cpu["im2col"]) / np.median(cpu["pabnn"]))
                                 if im2col_run is not None and threads == 1 else None),
            "best_ratio": min(samples["onnxruntime"]) / min(samples["pabnn"]),
            "cpu_ratio": float(np.median(cpu["onnxruntime"]) / np.median(cpu["pabnn"])) if threads == 1 else None,
            "pabnn_ms": 1e3 * medians["pabnn"], "onnxruntime_ms": 1e3 * medians["onnxruntime"],
            "sgemm_ms": 1e3 * medians["sgemm"],
            "pabnn_gmacs": macs / medians["pabnn"] / 1e9, "sgemm_gmacs": macs / medians["sgemm"] / 1e9}


def bench_pool(threads, repeats, seed=0):
    """The max-pool after the stem: pabnn's kernel vs ONNX Runtime, medians (ms) and best ratio."""
    import onnxruntime
    from onnx import TensorProto, helper

    name, channels, size = POOL
    x = np.random.default_rng(seed).normal(size=(1, channels, size, size)).astype(np.float32)
    attributes = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    kernel_run = get_op("MaxPool").make_kernel(Node("MaxPool", "pool", ["x"], ["y"], attributes))
    out = np.empty((1, channels, size // 2, size // 2), np.float32)
    graph = helper.make_graph([helper.make_node("MaxPool", ["x"], ["y"], **attributes)], "pool",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), options,
        providers=["CPUExecutionProvider"])
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        kernel_run([x], out=out)
        assert np.array_equal(out, session.run(None, {"x": x})[0])
        samples = {"pabnn": [], "onnxruntime": []}
        for _ in range(repeats):
            samples["onnxruntime"].append(_timed(lambda: session.run(None, {"x": x})))
            samples["pabnn"].append(_timed(lambda: kernel_run([x], out=out)))
    finally:
        numba.set_num_threads(previous)
    medians = {key: 1e3 * float(np.median(values)) for key, values in samples.items()}
    return name, medians["pabnn"], medians["onnxruntime"], min(samples["onnxruntime"]) / min(samples["pabnn"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per engine (median)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shapes", nargs="+", default=None, help="substrings of shape names to run")
    args = parser.parse_args(argv)
    shapes = [shape for shape in SHAPES if args.shapes is None or any(s in shape[0] for s in args.shapes)]
    print(f"{'conv':24s} {'threads':>7s} {'pabnn ms':>9s} {'ORT ms':>8s} {'ORT/pabnn':>9s} {'sgemm ms':>9s} "
          f"{'pabnn GMAC/s':>12s} {'sgemm GMAC/s':>12s} {'of sgemm':>8s} {'best ORT/pabnn':>14s} "
          f"{'CPU ORT/pabnn':>13s} {'max err':>8s} {'im2col ms':>9s} {'CPU im2col/pabnn':>16s}")
    for shape in shapes:
        for threads in args.threads:
            row = bench_shape(shape, threads, args.repeats)
            print(f"{row['name']:24s} {row['threads']:7d} {row['pabnn_ms']:9.2f} {row['onnxruntime_ms']:8.2f} "
                  f"{row['onnxruntime_ms'] / row['pabnn_ms']:8.2f}x {row['sgemm_ms']:9.2f} "
                  f"{row['pabnn_gmacs']:12.1f} {row['sgemm_gmacs']:12.1f} "
                  f"{row['pabnn_gmacs'] / row['sgemm_gmacs']:8.0%} {row['best_ratio']:13.2f}x "
                  f"{'%12.2fx' % row['cpu_ratio'] if row['cpu_ratio'] else '%13s' % '-'} {row['error']:8.1e} "
                  f"{'%9.2f' % row['im2col_ms'] if row['im2col_ms'] else '%9s' % '-'} "
                  f"{'%15.2fx' % row['im2col_cpu_ratio'] if row['im2col_cpu_ratio'] else '%16s' % '-'}",
                  flush=True)
    if args.shapes is None or any(s in POOL[0] for s in args.shapes):
        for threads in args.threads:
            name, pabnn_ms, onnxruntime_ms, best = bench_pool(threads, args.repeats)
            print(f"{name:24s} {threads:7d} {pabnn_ms:9.2f} {onnxruntime_ms:8.2f} {onnxruntime_ms / pabnn_ms:8.2f}x "
                  f"{'':9s} {'':12s} {'':12s} {'':8s} {best:13.2f}x", flush=True)


if __name__ == "__main__":
    main()
