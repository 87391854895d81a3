"""Integer convolution: the direct kernel vs the DFNT kernel vs the float32 Conv (pabnn, ONNX Runtime).

For each conv shape and thread count, timed in alternation in one process (medians of --repeats
runs, batch 1), each writing a preallocated output:

- direct, dfnt: the IntConv op's two exact kernels (engine/ops/int_conv.py, int_conv_dfnt.py),
  quantizer and rescale included (numba threads = threads);
- float: pabnn's own float Conv op kernel on the same weights (im2col + BLAS or Winograd, the BLAS
  held to one thread as inside `Session.run`);
- ORT: ONNX Runtime's float32 Conv (a one-node model), the peer.

Both integer kernels are checked equal to each other bit for bit before timing. Printed: wall
medians (ms), "best" ratios (fastest run against fastest run, less exposed to preemption on a
shared machine) and, at 1 thread, ratios of median process CPU time (time.process_time) and the
faster integer kernel's median CPU ms. "int" is the faster of the two integer kernels. The load
average is printed first.

    python benchmarks/integer_conv.py [--repeats 20] [--threads 1 2]
"""
import argparse
import os
import time

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from float_conv import onnx_conv_session  # the script beside this one

from pabnn.engine.graph import Node
from pabnn.engine.ops import get_op
from pabnn.engine.ops.int_conv import make_conv_kernel

# name, in_channels, out_channels, kernel, stride, pad, input size (batch 1, square)
SHAPES = [
    ("stem 7x7/2 3->64 @224", 3, 64, 7, 2, 3, 224),
    ("3x3 64->64 @56", 64, 64, 3, 1, 1, 56),
    ("7x7 64->64 @28", 64, 64, 7, 1, 3, 28),  # stride 1: near the crossover
    ("11x11 3->16 @64", 3, 16, 11, 1, 5, 64),  # the DFNT's side of the crossover
]
ENGINES = ("direct", "dfnt", "float", "ORT")
_CONTROLLER = ThreadpoolController()


def bench_shape(shape, threads, repeats, seed=0):
    name, in_channels, out_channels, kernel, stride, pad, size = shape
    rng = np.random.default_rng(seed)
    weight = rng.integers(-127, 128, (out_channels, in_channels, kernel, kernel)).astype(np.int8)
    weight_scale = rng.uniform(0.5, 1.5, out_channels).astype(np.float32) / np.float32(127 * kernel * kernel)
    bias = rng.normal(0, 0.1, out_channels).astype(np.float32)
    x = (rng.integers(0, 256, (1, in_channels, size, size)) / 255.0).astype(np.float32)  # pixels, exact grid
    geometry = {"strides": [stride, stride], "pads": [pad] * 4, "dilations": [1, 1]}
    int_node = Node("IntConv", "conv", ["x"], ["y"], dict(geometry, input_zero_point=0),
                    {"weight": weight, "weight_scale": weight_scale,
                     "input_scale": np.array([1 / 255], np.float32), "bias": bias})
    float_weight = (weight * weight_scale[:, None, None, None]).astype(np.float32)
    float_node = Node("Conv", "conv", ["x"], ["y"], geometry, {"weight": float_weight, "bias": bias})
    (output_shape,) = get_op("IntConv").infer_shapes(int_node, [(None,) + x.shape[1:]])
    outs = {engine: np.empty((1,) + output_shape[1:], np.float32) for engine in ENGINES[:3]}
    kernels = {"direct": make_conv_kernel(int_node, "direct"), "dfnt": make_conv_kernel(int_node, "dfnt"),
               "float": get_op("Conv").make_kernel(float_node)}
    session = onnx_conv_session(float_weight, bias, stride, pad, threads)
    runs = {engine: (lambda engine=engine: kernels[engine]([x], out=outs[engine])) for engine in kernels}
    runs["ORT"] = lambda: session.run(None, {"x": x})
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        with _CONTROLLER.limit(limits=1, user_api="blas"):
            for run in runs.values():
                run()
            if not np.array_equal(outs["direct"], outs["dfnt"]):
                raise AssertionError(f"{name}: the direct and DFNT kernels differ")
            wall = {engine: [] for engine in ENGINES}
            cpu = {engine: [] for engine in ENGINES}
            for _ in range(repeats):
                for engine in ENGINES:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    runs[engine]()
                    wall[engine].append(time.perf_counter() - start)
                    cpu[engine].append(time.process_time() - start_cpu)
    finally:
        numba.set_num_threads(previous)
    return {"name": name, "threads": threads,
            "ms": {engine: 1e3 * float(np.median(wall[engine])) for engine in ENGINES},
            "best": {engine: float(min(wall[engine])) for engine in ENGINES},
            "cpu": {engine: float(np.median(cpu[engine])) for engine in ENGINES}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per engine (median)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'conv':22s} {'thr':>3s} " + " ".join(f"{e + ' ms':>9s}" for e in ENGINES)
          + f" {'direct/dfnt':>11s} {'float/int':>9s} {'ORT/int':>7s}   best: {'direct/dfnt':>11s} {'float/int':>9s}"
          + f" {'ORT/int':>7s}   CPU: {'direct/dfnt':>11s} {'float/int':>9s} {'ORT/int':>7s} {'int ms':>6s}")
    for shape in SHAPES:
        for threads in args.threads:
            row = bench_shape(shape, threads, args.repeats)
            ms, best, cpu = row["ms"], row["best"], row["cpu"]
            faster = min(ms["direct"], ms["dfnt"])
            best_int = min(best["direct"], best["dfnt"])
            text = (f"{row['name']:22s} {threads:3d} " + " ".join(f"{ms[e]:9.2f}" for e in ENGINES)
                    + f" {ms['direct'] / ms['dfnt']:10.2f}x {ms['float'] / faster:8.2f}x {ms['ORT'] / faster:6.2f}x"
                    + f"   best: {best['direct'] / best['dfnt']:10.2f}x {best['float'] / best_int:8.2f}x"
                    + f" {best['ORT'] / best_int:6.2f}x")
            if threads == 1:
                cpu_int = min(cpu["direct"], cpu["dfnt"])
                text += (f"   CPU: {cpu['direct'] / cpu['dfnt']:10.2f}x {cpu['float'] / cpu_int:8.2f}x"
                         f" {cpu['ORT'] / cpu_int:6.2f}x {1e3 * cpu_int:6.2f}")
            print(text, flush=True)


if __name__ == "__main__":
    main()
