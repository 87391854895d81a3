"""What the steps' state saves a Session run (registry.Op.keeps_state): BinaryConv, ConvMaxPool
and AmxConv write their bit-planes and codes into the same arrays every run, and a BinaryConv run
like the last repeats its kernel call as built. Two Sessions of one converted network, one with
its steps' state and one whose kernels were bound without it, run in alternating blocks of
`--runs` in one process; medians (ms) of each and the ratio, per network and thread count, and
whether both gave the same bits.

    python benchmarks/step_state.py [--bases 1,1 2,2] [--act-coding thermometer] [--threads 1 2]
        [--blocks 30] [--runs 20]

Networks are `pabnn bench`'s ResNet-18 (converters/bench.py). The stateless Session gets its
kernels bound (at its first run) while the registry reports no op keeping state.
"""
import argparse
import contextlib
import dataclasses
import os
import time

import numpy as np

from pabnn.converters.bench import _converted
from pabnn.engine import session as session_module
from pabnn.engine.ops import get_op
from pabnn.engine.session import Session


@contextlib.contextmanager
def _no_state():
    """Ops as the registry has them, but none keeping state, for the kernels bound meanwhile."""
    def stateless(name, node_name="?"):
        return dataclasses.replace(get_op(name, node_name), keeps_state=False)

    session_module.get_op = stateless
    try:
        yield
    finally:
        session_module.get_op = get_op


def compare(graph, feeds, threads, blocks, runs):
    """(median ms with state, median ms without, same outputs) over alternating blocks of runs."""
    with_state = Session(graph, threads=threads)
    without_state = Session(graph, threads=threads)
    with _no_state():
        without_state.run(None, feeds)  # binds its kernels for this thread and batch size
    times = {"with": [], "without": []}
    outputs = {}
    for block in range(blocks):
        order = (("with", with_state), ("without", without_state))
        for name, session in order if block % 2 == 0 else order[::-1]:
            for _ in range(3):  # the other Session's caches out of the way
                session.run(None, feeds)
            for _ in range(runs):
                start = time.perf_counter()
                result = session.run(None, feeds)
                times[name].append(time.perf_counter() - start)
            outputs[name] = result[0].copy()
    same = np.array_equal(outputs["with"].view(np.uint32), outputs["without"].view(np.uint32))
    return 1e3 * np.median(times["with"]), 1e3 * np.median(times["without"]), same


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bases", nargs="+", default=["1,1", "2,2"], metavar="M,N")
    parser.add_argument("--act-coding", choices=["thermometer", "binary"], default="thermometer")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--blocks", type=int, default=30, help="alternating blocks per Session")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per block")
    args = parser.parse_args(argv)
    load = [os.getloadavg()[0]]
    print("| network | threads | with state ms | without ms | without / with | same bits |")
    print("| --- | --- | --- | --- | --- | --- |")
    for bases in args.bases:
        weight_bases, act_bases = (int(value) for value in bases.split(","))
        _, shape, converted = _converted("resnet18", weight_bases, act_bases, act_coding=args.act_coding)
        feeds = {"input": np.random.default_rng(1).normal(size=shape).astype(np.float32)}
        for threads in args.threads:
            with_ms, without_ms, same = compare(converted.graph, feeds, threads, args.blocks, args.runs)
            print(f"| resnet18 PA({weight_bases},{act_bases}) {args.act_coding} | {threads} | {with_ms:.2f} | "
                  f"{without_ms:.2f} | {without_ms / with_ms:.3f}x | {same} |", flush=True)
    load.append(os.getloadavg()[0])
    print(f"load average {min(load):.1f}-{max(load):.1f}")


if __name__ == "__main__":
    main()
