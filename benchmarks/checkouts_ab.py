"""Two checkouts of pabnn on the same .pab files, in alternating processes (before/after a change).

Each side runs in its own process with PYTHONPATH set to that side's package folder (empty: the
installed pabnn), loads the file, runs it --warmup times, then times --runs runs: wall median,
process CPU time median and the fastest run. Rounds alternate the sides for every file and
thread count, so both share the machine's state of that minute; the summary pools the rounds
(medians of the rounds' medians) and checks that both sides' outputs are the same bits.

    pip install --no-deps --target /tmp/before <a checkout of the other commit>
    python benchmarks/checkouts_ab.py --before /tmp/before model.pab [more.pab] [--threads 1 2] [--rounds 4]

(A .pab of the bench networks: `pabnn.converters.bench._converted("resnet18", 1, 1)[2].save(path)`.)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

_SIDE = """
import json, os, sys, time
import numpy as np
import pabnn
from pabnn.engine import load
path, threads, warmup, runs, output = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
session = load(path, threads=threads)
name = session.input_names[0]
shape = [1 if size is None else size for size in session.graph.inputs[0].shape]
feeds = {name: np.random.default_rng(1).normal(size=shape).astype(np.float32)}
for _ in range(warmup):
    session.run(None, feeds)
wall, cpu = [], []
for _ in range(runs):
    start, start_cpu = time.perf_counter(), time.process_time()
    session.run(None, feeds)
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
np.save(output, session.run(None, feeds)[0])
print(json.dumps({"package": os.path.dirname(pabnn.__file__), "wall_ms": 1e3 * float(np.median(wall)),
                  "cpu_ms": 1e3 * float(np.median(cpu)), "best_ms": 1e3 * min(wall)}))
"""


def run_side(pythonpath, path, threads, warmup, runs, output):
    environment = dict(os.environ)
    if pythonpath:
        environment["PYTHONPATH"] = pythonpath
    else:
        environment.pop("PYTHONPATH", None)
    completed = subprocess.run([sys.executable, "-c", _SIDE, path, str(threads), str(warmup), str(runs), output],
                               env=environment, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help=".pab files")
    parser.add_argument("--before", required=True, help="PYTHONPATH of the 'before' side's pabnn package")
    parser.add_argument("--after", default="", help="PYTHONPATH of the 'after' side (default: the installed pabnn)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    sides = {"before": args.before, "after": args.after}
    records = {}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as folder:
        outputs = {}
        for _ in range(args.rounds):
            for path in args.files:
                for threads in args.threads:
                    for side, pythonpath in sides.items():
                        output = os.path.join(folder, f"{side}-{len(outputs)}.npy")
                        record = run_side(pythonpath, path, threads, args.warmup, args.runs, output)
                        records.setdefault((path, threads), {}).setdefault(side, []).append(record)
                        outputs.setdefault((path, threads), {})[side] = np.load(output)
            loads.append(os.getloadavg()[0])
        print(f"load average {min(loads):.2f}-{max(loads):.2f}; packages: "
              + ", ".join(f"{side} {records[next(iter(records))][side][0]['package']}" for side in sides))
        print("| file | threads | before ms | after ms | speed-up (wall) | CPU time before / after | "
              "best before / after | same bits |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for (path, threads), by_side in records.items():
            def median(side, key):
                return float(np.median([record[key] for record in by_side[side]]))
            before, after = median("before", "wall_ms"), median("after", "wall_ms")
            best = [min(record["best_ms"] for record in by_side[side]) for side in sides]
            same = np.array_equal(outputs[(path, threads)]["before"].view(np.uint32),
                                  outputs[(path, threads)]["after"].view(np.uint32))
            print(f"| {os.path.basename(path)} | {threads} | {before:.2f} | {after:.2f} | {before / after:.2f}x | "
                  f"{median('before', 'cpu_ms'):.2f} / {median('after', 'cpu_ms'):.2f} ms | "
                  f"{best[0]:.2f} / {best[1]:.2f} ms | {same} |")


if __name__ == "__main__":
    main()
