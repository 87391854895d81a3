"""Top-1 of the suite's networks after PA conversion (calibration only), against float.

For each network of examples/suite.py (trained and cached on first use), each calibration method
and each PA(M, N), the ONNX file is converted with pabnn.converters.convert on the first
--calibration images of the network's calibration split (drawn from its training split), run on
pabnn's engine over the chosen split, and compared with the float network run by the same
engine. Choose defaults on `validation`; report on `test` (DESIGN.md section 6).

    pip install ".[examples]"
    python examples/accuracy_suite.py [--networks vgg resnet ...] [--method equalized sequential ...]
        [--bases 1,1 2,2 3,3 4,5] [--split validation|test ...] [--calibration 256] [--json out.json] [--markdown]
        [--act-coding thermometer|binary]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import tqdm

from pabnn.converters import convert
from pabnn.converters.methods import DEFAULT_METHOD, METHODS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402


def parse_bases(text):
    """"M,N" -> (M, N)."""
    try:
        weight_bases, act_bases = (int(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected M,N such as 2,2, found {text!r}") from None
    return weight_bases, act_bases


def top1(model, images, labels):
    """Fraction of `images` whose largest logit, run by pabnn's engine, is the label."""
    (logits,) = model.session().run(None, {model.graph.inputs[0].name: images})
    return float(np.mean(logits.argmax(axis=1) == labels))


def measure(networks, methods, bases, splits, calibration_count, act_coding="thermometer"):
    """One row per (network, method, PA(M, N), split): {"network", "method", "weight_bases",
    "act_bases", "act_coding", "split", "images", "calibration_images", "float_top1", "pa_top1",
    "change", "seconds"} (seconds: the conversion's). Each conversion is scored on every split.
    act_coding: the binarized layers' activation code (pabnn.converters.convert)."""
    rows = []
    progress = tqdm.tqdm(total=len(networks) * len(methods) * len(bases), desc="conversions", file=sys.stderr)
    for name in networks:
        progress.set_postfix_str(f"{name}: loading")
        network = suite.network(name)
        calibration = network.calibration[:calibration_count]
        float_model = convert(network.onnx_path, calibration=calibration, binarize=[], progress=False)
        float_top1 = {split: top1(float_model, *getattr(network, split)) for split in splits}
        for method in methods:
            for weight_bases, act_bases in bases:
                progress.set_postfix_str(f"{name} {method} PA({weight_bases},{act_bases})")
                start = time.perf_counter()
                model = convert(network.onnx_path, calibration=calibration, weight_bases=weight_bases,
                                act_bases=act_bases, method=method, progress=False, act_coding=act_coding)
                seconds = round(time.perf_counter() - start, 1)
                for split in splits:
                    images, labels = getattr(network, split)
                    pa_top1 = top1(model, images, labels)
                    rows.append({"network": name, "method": method, "weight_bases": weight_bases,
                                 "act_bases": act_bases, "act_coding": act_coding, "split": split,
                                 "images": len(labels),
                                 "calibration_images": len(calibration), "float_top1": float_top1[split],
                                 "pa_top1": pa_top1, "change": pa_top1 - float_top1[split], "seconds": seconds})
                    progress.write(f"{name:10s} {method:12s} PA({weight_bases},{act_bases}) {split:10s} float "
                                   f"{100 * float_top1[split]:5.1f}%  PA {100 * pa_top1:5.1f}%  "
                                   f"({100 * (pa_top1 - float_top1[split]):+.1f})", file=sys.stdout)
                progress.update()
    progress.close()
    return rows


def markdown(rows, bases):
    """A README-style table of the rows of one split: one line per (network, method), one column
    per PA(M, N)."""
    header = ["network (float top-1)", "method"] + [f"PA({m},{n})" for m, n in bases]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    cells = {(row["network"], row["method"], row["weight_bases"], row["act_bases"]): row for row in rows}
    for network, method in dict.fromkeys((row["network"], row["method"]) for row in rows):
        first = cells[(network, method, *bases[0])]
        line = [f"{network} ({100 * first['float_top1']:.1f}%)", f"`{method}`"]
        for m, n in bases:
            row = cells[(network, method, m, n)]
            line.append(f"{100 * row['pa_top1']:.1f}% ({100 * row['change']:+.1f})")
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", choices=suite.NAMES, default=list(suite.NAMES))
    parser.add_argument("--method", nargs="+", choices=list(METHODS), default=[DEFAULT_METHOD],
                        help=f"calibration methods (default: {DEFAULT_METHOD})")
    parser.add_argument("--bases", nargs="+", type=parse_bases, default=[(1, 1), (2, 2), (3, 3), (4, 5)],
                        metavar="M,N", help="PA configurations (default: 1,1 2,2 3,3 4,5)")
    parser.add_argument("--split", nargs="+", choices=["validation", "test"], default=["validation"],
                        help="images to score on, one or both (default: validation; report on test)")
    parser.add_argument("--calibration", type=int, default=256,
                        help=f"calibration images, at most {suite.CALIBRATION_SIZE} (default: 256)")
    parser.add_argument("--act-coding", choices=["thermometer", "binary"], default="thermometer",
                        help="activation code of the binarized layers (default: thermometer; binary puts the "
                             "levels on a uniform grid in ceil(log2(N+1)) planes)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args()
    if not 1 <= args.calibration <= suite.CALIBRATION_SIZE:
        parser.error(f"--calibration must be in 1..{suite.CALIBRATION_SIZE}, found {args.calibration}")

    rows = measure(args.networks, args.method, args.bases, args.split, args.calibration, args.act_coding)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"splits": args.split, "calibration_images": args.calibration, "rows": rows}, handle, indent=1)
    if args.markdown:
        for split in args.split:
            print(f"\nTop-1 on the {split} split, calibration only ({args.calibration} calibration images, "
                  f"{args.act_coding} activation code); "
                  "in brackets the change against float, in points.\n")
            print(markdown([row for row in rows if row["split"] == split], args.bases))


if __name__ == "__main__":
    main()
