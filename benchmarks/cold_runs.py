"""Why `pabnn bench` times the single conv longer alternating than in a row: CPU and wall time
of the k-th pabnn run (conv3x3 at PA(1,1), as in `pabnn bench`) after ONNX Runtime's run, after
writing 64 MiB (evicts every cache), after writing 1 MiB, and after 20 ms of sleep. Process CPU
time at 1 thread leaves out the waits for a core on a shared machine. Medians over sequences.
With --clock, a fixed chain of dependent scalar multiply-adds is timed instead of pabnn's run:
its time follows the core's clock only, so it tells a slower clock from colder caches.

    python benchmarks/cold_runs.py [--threads 1] [--sequences 30] [--runs 5] [--clock]
"""
import argparse
import os
import time

import numba
import numpy as np
import onnxruntime

from pabnn.converters.bench import _converted
from pabnn.engine.session import Session


@numba.njit
def _scalar_chain(length, factor):
    """`length` dependent float64 multiplies and adds (factor known only at run time): nothing to
    vectorize, fold, reorder or cache."""
    value = 0.5
    for _ in range(length):
        value = value * factor + 1e-7
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sequences", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5, help="pabnn runs in a row after each action")
    parser.add_argument("--clock", action="store_true", help="time a scalar chain instead of pabnn's run")
    args = parser.parse_args(argv)
    model, shape, converted = _converted("conv3x3", 1, 1)
    feeds = {"input": np.random.default_rng(1).normal(size=shape).astype(np.float32)}
    session = Session(converted.graph, threads=args.threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    reference = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    large, small = np.ones(64 << 18, np.float32), np.ones(1 << 18, np.float32)
    actions = {"ONNX Runtime's run": lambda: reference.run(None, feeds), "writing 64 MiB": lambda: large.fill(2.0),
               "writing 1 MiB": lambda: small.fill(2.0), "sleeping 20 ms": lambda: time.sleep(0.02)}
    session.run(None, feeds)
    reference.run(None, feeds)
    _scalar_chain(10, 0.999)
    measured = (lambda: _scalar_chain(200_000, 0.999)) if args.clock else (lambda: session.run(None, feeds))
    wall = {key: [[] for _ in range(args.runs)] for key in actions}
    cpu = {key: [[] for _ in range(args.runs)] for key in actions}
    load = [os.getloadavg()[0]]
    for _ in range(args.sequences):
        for key, action in actions.items():
            action()
            for k in range(args.runs):
                start, start_cpu = time.perf_counter(), time.process_time()
                measured()
                wall[key][k].append(time.perf_counter() - start)
                cpu[key][k].append(time.process_time() - start_cpu)
    load.append(os.getloadavg()[0])
    print(f"{args.threads} thread(s), {args.sequences} sequences, load average {min(load):.1f}-{max(load):.1f}; "
          f"medians (ms) of the k-th {'scalar chain' if args.clock else 'pabnn run'} after:")
    for key in actions:
        print(f"  {key:20s} " + "  ".join(f"#{k + 1}: CPU {1e3 * np.median(cpu[key][k]):5.2f} wall "
                                           f"{1e3 * np.median(wall[key][k]):5.2f}" for k in range(args.runs)))


if __name__ == "__main__":
    main()
