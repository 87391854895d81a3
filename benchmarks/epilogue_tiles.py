"""What a tile's epilogue costs beside its counting: the direct micro-kernels on L1-resident data.

One tile is 8 output pixels x 16 channels counted over a window of --words 64-bit words
(engine/popcount_block.py). `popcount_direct_block` alone (counts, products, stored channel-major)
is the baseline; `popcount_direct_epilogue` finishes the tile in registers with what a layer's
output needs: the next layer's thermometer planes only, a float32 output (channel-major rows as
NCHW holds them, or channels-last), a residual added, both. Each case runs --calls calls in one
njit loop; the rounds alternate the cases, and the table gives the medians in ns per tile and
against the baseline.

    python benchmarks/epilogue_tiles.py [--words 9 18 72] [--calls 200000] [--rounds 7]
"""
import argparse
import time

import numpy as np
from numba import njit

from pabnn.engine.popcount_block import (DIRECT_CHANNELS, DIRECT_PIXELS, popcount_direct_block,
                                        popcount_direct_epilogue)

# (label, has_residual, write_y, planes, (channel stride, pixel stride) of y and the residual)
CHANNEL_MAJOR, CHANNELS_LAST = (64, 1), (1, 64)
CASES = [("planes only", False, False, 1, CHANNEL_MAJOR),
         ("float32 y (channel-major)", False, True, 0, CHANNEL_MAJOR),
         ("y + residual (channel-major)", True, True, 0, CHANNEL_MAJOR),
         ("y + residual + planes (channel-major)", True, True, 1, CHANNEL_MAJOR),
         ("y + residual + planes (channels-last)", True, True, 1, CHANNELS_LAST)]


@njit
def _count_only(calls, activations, bases, offsets, length, weights, scales, result):
    for i in range(calls):
        popcount_direct_block(activations, bases, 0, i & 7, offsets, length, weights, 0, scales, 0, result, 0,
                              DIRECT_PIXELS, False)


@njit
def _with_epilogue(calls, has_residual, write_y, n_thresholds, channel_stride, pixel_stride, activations, bases,
                   offsets, length, weights, scales, partial, constant, lowest_weight, act_terms, thresholds, words,
                   word_bases, residual, y):
    for i in range(calls):
        popcount_direct_epilogue(activations, bases, 0, i & 7, offsets, length, weights, 0, scales, 0, partial, False,
                                 True, constant, lowest_weight, 0, act_terms, 0, True, residual, has_residual, 0,
                                 channel_stride, pixel_stride, y, write_y, 0, channel_stride, pixel_stride,
                                 DIRECT_CHANNELS, DIRECT_PIXELS, thresholds, DIRECT_CHANNELS, n_thresholds, words,
                                 word_bases, 1024, 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--words", type=int, nargs="+", default=[9, 18, 72], help="window lengths (64-bit words)")
    parser.add_argument("--calls", type=int, default=200000)
    parser.add_argument("--rounds", type=int, default=7)
    arguments = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| window words | kernel | ns per tile | against counting only |")
    print("| --- | --- | --- | --- |")
    for length in arguments.words:
        activations = rng.integers(0, 2**63, 4096, dtype=np.int64).view(np.uint64)
        bases = np.arange(DIRECT_PIXELS, dtype=np.int64) * 4
        offsets = (np.arange(length, dtype=np.int64) * 37) % 2048
        weights = rng.integers(0, 2**63, DIRECT_CHANNELS * length, dtype=np.int64).view(np.uint64)
        scales = np.full(DIRECT_CHANNELS, 0.01)
        partial = np.zeros(DIRECT_CHANNELS * DIRECT_PIXELS)
        common = (activations, bases, offsets, length, weights, scales, partial)
        data = (rng.normal(size=DIRECT_CHANNELS), rng.normal(size=DIRECT_CHANNELS) * 0.01,
                rng.normal(size=DIRECT_PIXELS), rng.normal(size=DIRECT_CHANNELS).astype(np.float32),
                np.zeros(4096, np.uint16), np.arange(DIRECT_PIXELS, dtype=np.int64) * 16,
                rng.normal(size=DIRECT_CHANNELS * 64).astype(np.float32), np.zeros(DIRECT_CHANNELS * 64, np.float32))
        runs = [("counting only", lambda calls: _count_only(calls, *common))]
        for label, has_residual, write_y, planes, strides in CASES:
            runs.append((label, lambda calls, c=(has_residual, write_y, planes) + strides: _with_epilogue(
                calls, *c, *common, *data)))
        times = {label: [] for label, _ in runs}
        for _, run in runs:
            run(10)  # compile
        for _ in range(arguments.rounds):
            for label, run in runs:
                start = time.perf_counter()
                run(arguments.calls)
                times[label].append((time.perf_counter() - start) / arguments.calls * 1e9)
        baseline = np.median(times["counting only"])
        for label, _ in runs:
            median = np.median(times[label])
            print(f"| {length} | {label} | {median:.1f} | {median / baseline:.2f}x |")


if __name__ == "__main__":
    main()
