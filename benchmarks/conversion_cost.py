"""Conversion time and peak memory of ResNet-18 at 224x224 (random weights, `pabnn bench`'s network).

    python benchmarks/conversion_cost.py [--images 64 256] [--method selected] [--bases 2,2]

Each configuration runs in a fresh process, so its peak resident memory (ru_maxrss) is its own;
the baseline line is the same process importing pabnn and building the network without converting.
Calibration images are random normal: the cost of calibration does not depend on their content.
"""
import argparse
import json
import resource
import subprocess
import sys
import time


def measure(images, method, weight_bases, act_bases, convert_too):
    """(seconds, peak resident MB) of converting ResNet-18 with `images` calibration images."""
    import numpy as np

    from pabnn.converters import convert
    from pabnn.converters.bench import resnet18_network

    model, input_shape, _ = resnet18_network(0)
    calibration = np.random.default_rng(0).normal(size=(images,) + input_shape[1:]).astype(np.float32)
    start = time.perf_counter()
    if convert_too:
        convert(model, calibration=calibration, weight_bases=weight_bases, act_bases=act_bases, method=method,
                progress=False)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--method", default="selected")
    parser.add_argument("--bases", default="2,2", help="M,N (default 2,2)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    weight_bases, act_bases = (int(v) for v in args.bases.split(","))
    if args.child is not None:
        seconds, peak = measure(args.child, args.method, weight_bases, act_bases, convert_too=args.child > 0)
        print(json.dumps({"seconds": seconds, "peak_mb": peak}))
        return
    print(f"ResNet-18 at 224, PA({weight_bases},{act_bases}), method {args.method!r}")
    print(f"{'images':>7} {'convert s':>10} {'peak MB':>8}")
    for images in [0] + args.images:
        output = subprocess.run([sys.executable, __file__, "--child", str(images), "--method", args.method,
                                 "--bases", args.bases], capture_output=True, text=True, check=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        label = "none" if images == 0 else str(images)
        print(f"{label:>7} {result['seconds']:>10.1f} {result['peak_mb']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
