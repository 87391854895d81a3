"""Choosing the calibration method per network on calibration images held out from the fit.

For each suite network (examples/suite.py), PA(M, N) and candidate method, the network is converted
on the first 3/4 of its --calibration images and run on the last 1/4, which the fit did not see;
against the float network there it is scored by three label-free measures: the mean
KL(softmax(float) || softmax(PA)), top-1 agreement, and the relative squared error of the outputs
sum (y - f)^2 / sum f^2. `score` writes those rows; `report` picks, per network and PA(M, N), the
candidate with the best score of each measure and looks up that method's top-1 change when
converted on all --calibration images (the rows of examples/accuracy_suite.py --json), so that the
rule "convert with each candidate, keep the one the held-out images prefer" can be compared with
the default method on the validation and test splits (docs/accuracy.md).

    python examples/method_choice_held_out.py score --networks vgg resnet --json scores.json
    python examples/method_choice_held_out.py report scores.json --results results/*.json
"""
import argparse
import json
import os
import sys

import numpy as np

from pabnn.converters import convert
from pabnn.converters.diagnostics import classification_metrics
from pabnn.converters.methods import DEFAULT_METHOD

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402

CANDIDATES = ("selected", "equalized", "rounding", "regression")
BASES = ((1, 1), (2, 2), (3, 3), (4, 5))
MEASURES = {"kl": min, "agreement": max, "relative_error": min}  # measure -> which end is best


def outputs(model, images):
    (logits,) = model.session().run(None, {model.graph.inputs[0].name: images})
    return logits.astype(np.float64)


def softmax(logits):
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def held_out_scores(float_logits, logits):
    """{"kl", "agreement", "relative_error"} of PA `logits` against `float_logits` [images, classes]."""
    p, q = softmax(float_logits), softmax(logits)
    kl = np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))), axis=1)
    agreement = classification_metrics(logits, float_logits=float_logits)["top1_agreement"]
    return {"kl": float(np.mean(kl)), "agreement": agreement,
            "relative_error": float(np.sum((logits - float_logits) ** 2) / np.sum(float_logits ** 2))}


def score(networks, methods, calibration_count):
    rows = []
    for name in networks:
        network = suite.network(name, progress=False)
        calibration = network.calibration[:calibration_count]
        split = len(calibration) * 3 // 4
        fit, held = calibration[:split], calibration[split:]
        float_logits = outputs(convert(network.onnx_path, calibration=fit, binarize=[], progress=False), held)
        for weight_bases, act_bases in BASES:
            for method in methods:
                model = convert(network.onnx_path, calibration=fit, weight_bases=weight_bases, act_bases=act_bases,
                                method=method, progress=False)
                row = dict(network=name, weight_bases=weight_bases, act_bases=act_bases, method=method,
                           fit_images=len(fit), held_images=len(held),
                           **held_out_scores(float_logits, outputs(model, held)))
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def report(scores, results, default=DEFAULT_METHOD):
    """Per measure and split: the mean over networks, per PA(M, N), of the top-1 change (points) of
    the method each cell's held-out measure prefers, beside the default's."""
    changes = {(row["network"], row["weight_bases"], row["act_bases"], row["method"], row["split"]): 100 * row["change"]
               for row in results}
    cells = {}
    for row in scores:
        cells.setdefault((row["network"], row["weight_bases"], row["act_bases"]), {})[row["method"]] = row
    lines = []
    for measure, best in MEASURES.items():
        for split in ("validation", "test"):
            chosen, default_changes = {}, {}
            for (network, m, n), by_method in sorted(cells.items()):
                pick = best(sorted(by_method), key=lambda method: by_method[method][measure])
                chosen.setdefault((m, n), []).append(changes[network, m, n, pick, split])
                default_changes.setdefault((m, n), []).append(changes[network, m, n, default, split])
            means = " | ".join(f"{np.mean(chosen[pa]):+.2f} / {np.mean(default_changes[pa]):+.2f}"
                               for pa in sorted(chosen))
            lines.append(f"| {measure} | {split} | {means} |")
    bases = sorted({(m, n) for _, m, n in cells})
    header = " | ".join(f"PA({m},{n})" for m, n in bases)
    return "\n".join([f"| held-out measure | split | {header} |", "|" + " --- |" * (2 + len(bases))] + lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    scoring = commands.add_parser("score", help="convert on 3/4 of the calibration images, score on the rest")
    scoring.add_argument("--networks", nargs="+", choices=suite.NAMES, default=list(suite.NAMES))
    scoring.add_argument("--method", nargs="+", default=list(CANDIDATES), help="candidate methods")
    scoring.add_argument("--calibration", type=int, default=256, help="calibration images (default: 256)")
    scoring.add_argument("--json", required=True, metavar="PATH", help="write the rows here")
    reporting = commands.add_parser("report", help="the top-1 change of the preferred method per cell")
    reporting.add_argument("scores", nargs="+", help="JSON files of `score`")
    reporting.add_argument("--results", nargs="+", required=True, help="JSON files of accuracy_suite.py --json")
    args = parser.parse_args()
    if args.command == "score":
        rows = score(args.networks, args.method, args.calibration)
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    else:
        scores = [row for path in args.scores for row in json.load(open(path))]
        results = [row for path in args.results for row in json.load(open(path))["rows"]]
        print("Mean top-1 change over the networks (points): the method the held-out measure prefers / "
              f"the default ({DEFAULT_METHOD})\n")
        print(report(scores, results))


if __name__ == "__main__":
    main()
