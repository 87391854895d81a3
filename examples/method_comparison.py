"""How far the default calibration method is from the best other method, per network and PA(M, N).

Reads the JSON files written by examples/accuracy_suite.py --json (one or several, e.g. one per
method) and prints, per split, a markdown table: for each network and PA(M, N), the default
method's change against float, the best of the other methods' changes (and which method; ties
are all named) and the gap, the best's change minus the default's, in points (positive: the
default is behind; two decimals, as one image of 300 is 0.33 points). Then, per split, in how
many cells the gap is at most --within points.

    python examples/method_comparison.py results/*.json [--default selected] [--within 0.3]
"""
import argparse
import json

from pabnn.converters.methods import DEFAULT_METHOD

# Changes are differences of top-1 fractions: a gap of exactly --within points must count as within.
ROUNDING = 1e-9


def compare(rows, default=DEFAULT_METHOD):
    """One cell per (network, weight_bases, act_bases) of `rows` (rows of one split) that has a
    row of `default` and of at least one other method: {"network", "weight_bases", "act_bases",
    "default_change", "best_change", "best_methods", "gap"}; changes and gap in points."""
    changes = {}
    for row in rows:
        key = (row["network"], row["weight_bases"], row["act_bases"])
        if row["method"] in changes.setdefault(key, {}):
            raise ValueError(f"two rows of {row['method']!r} for {row['network']} "
                             f"PA({row['weight_bases']},{row['act_bases']}) on the {row['split']} split")
        changes[key][row["method"]] = 100 * row["change"]
    cells = []
    for (network, weight_bases, act_bases), by_method in changes.items():
        others = {method: change for method, change in by_method.items() if method != default}
        if default not in by_method or not others:
            continue
        best = max(others.values())
        cells.append({"network": network, "weight_bases": weight_bases, "act_bases": act_bases,
                      "default_change": by_method[default], "best_change": best,
                      "best_methods": sorted(method for method, change in others.items()
                                             if change >= best - ROUNDING),
                      "gap": best - by_method[default]})
    return cells


def markdown(cells, default, within):
    """The cells as a markdown table, one line per (network, PA(M, N))."""
    lines = [f"| network | PA | `{default}` | best other method | gap (points) | within {within} |",
             "| --- | --- | --- | --- | --- | --- |"]
    for cell in cells:
        methods = ", ".join(f"`{method}`" for method in cell["best_methods"])
        lines.append(f"| {cell['network']} | ({cell['weight_bases']},{cell['act_bases']}) "
                     f"| {cell['default_change']:+.1f} | {cell['best_change']:+.1f} {methods} "
                     f"| {cell['gap']:+.2f} | {'yes' if cell['gap'] <= within + ROUNDING else 'no'} |")
    return "\n".join(lines)


def summary(cells, within):
    """"k of n cells within `within` points; the largest gap and where"."""
    count = sum(cell["gap"] <= within + ROUNDING for cell in cells)
    worst = max(cells, key=lambda cell: cell["gap"])
    methods = ", ".join(worst["best_methods"])
    return (f"{count} of {len(cells)} cells within {within} points of the best other method; largest gap "
            f"{worst['gap']:+.2f} points ({worst['network']} PA({worst['weight_bases']},{worst['act_bases']}), "
            f"{methods})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+", help="files written by examples/accuracy_suite.py --json")
    parser.add_argument("--default", default=DEFAULT_METHOD, help=f"the method compared (default: {DEFAULT_METHOD})")
    parser.add_argument("--within", type=float, default=0.3, help="allowed gap in points (default: 0.3)")
    args = parser.parse_args()
    rows = []
    for path in args.json:
        with open(path) as handle:
            rows.extend(json.load(handle)["rows"])
    for split in dict.fromkeys(row["split"] for row in rows):
        cells = compare([row for row in rows if row["split"] == split], args.default)
        if not cells:
            parser.error(f"{split} split: no cell has rows of {args.default!r} and of another method")
        print(f"\n{split} split: the change against float of `{args.default}` and of the best other method, "
              "in points.\n")
        print(markdown(cells, args.default, args.within))
        print(f"\n{split}: {summary(cells, args.within)}")


if __name__ == "__main__":
    main()
