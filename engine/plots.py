"""Pictures of a model report and of a benchmark profile: `pabnn report --plot`, `pabnn bench --plot`.

Two steps, so that what is drawn can be tested apart from the drawing:

- `report_panels(report)` and `profile_panels(results)` turn the numbers of `model_report` (and
  the per-layer SQNR of `pabnn report --calibration`) or of `bench_case` into panels, plain
  dicts: {"title", "xlabel", "log", "layers": [name...], "series": {legend: [value per layer]}};
  a value of None draws no bar (a layer the panel says nothing about).
- `save_panels(panels, path)` draws them side by side as horizontal bars (one row per layer,
  names on the left, read top to bottom in graph order) and writes a PNG or an SVG, chosen by
  the suffix, atomically.

matplotlib is an optional extra (pip install "pabnn[plot]"): it is imported inside
`save_panels` only, with its non-interactive Agg backend, so the engine never needs it.
"""
import importlib.util
import io
import os

from .errors import PabnnError
from .pab_format import write_atomically

PLOT_FORMATS = (".png", ".svg")
# Inches per layer row and for the title and axis labels around the rows.
_ROW_INCHES = 0.36
_MARGIN_INCHES = 1.6


def check_plot_path(path):
    """Refuse a plot path whose suffix is not .png or .svg or whose folder is missing, and refuse
    to plot without matplotlib, before any work. Returns the suffix."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in PLOT_FORMATS:
        raise PabnnError(f"plot {path}: expected a file name ending in .png or .svg, found suffix {suffix!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PabnnError(f"plot {path}: folder {folder} does not exist")
    _require_matplotlib()
    return suffix


def _require_matplotlib():
    if importlib.util.find_spec("matplotlib") is None:
        raise PabnnError('plotting needs matplotlib, which is not installed: pip install "pabnn[plot]"')


def report_panels(report, layer_sqnr=None):
    """Panels of a `model_report(graph)` for the layers that hold parameters (convs, linears,
    affine layers), in graph order:

    1. stored bytes of the layer's parameters in the .pab file against float32 bytes (4 x params);
    2. float32 FLOPs of the float model, BOPs/64 and FLOPs of the converted layer (its OPs are
       FLOPs + BOPs/64, the Bi-Real/ReActNet convention), per sample;
    3. with `layer_sqnr` (rows {"layer", "kind", "sqnr_db"} of `pabnn report --calibration`): each
       binarized (or refitted) layer's output SQNR in dB against the float network.
    """
    rows = [row for row in report["layers"] if row["params"] > 0]
    names = [f"{row['name']} [{row['kind']}]" for row in rows]
    panels = [
        {"title": "parameter bytes", "xlabel": "bytes (log scale)", "log": True, "layers": names,
         "series": {"float32": [row["float32_bytes"] for row in rows],
                    "stored in .pab": [row["stored_bytes"] for row in rows]}},
        {"title": "operations per sample", "xlabel": "operations (log scale)", "log": True, "layers": names,
         "series": {"float32 model FLOPs": [row["float_flops"] for row in rows],
                    "BOPs/64": [row["bops"] / 64 for row in rows],
                    "FLOPs": [row["flops"] for row in rows]}},
    ]
    if layer_sqnr is not None:
        sqnr = {row["layer"]: row["sqnr_db"] for row in layer_sqnr}
        panels.append({"title": "output SQNR vs float", "xlabel": "dB", "log": False, "layers": names,
                       "series": {"SQNR": [sqnr.get(row["name"]) for row in rows]}})
    return panels


def profile_panels(results):
    """One panel per `bench_case` result: milliseconds per layer (median of the profile runs) at
    each thread count measured, in graph order."""
    panels = []
    for result in results:
        first = result["threads"][0]["profile"]
        names = [f"{layer['name']} [{layer['kind']}]" for layer in first]
        series = {}
        for row in result["threads"]:
            times = {layer["name"]: layer["ms"] for layer in row["profile"]}
            series[f"{row['threads']} thread{'s' if row['threads'] > 1 else ''}"] = [
                times.get(layer["name"]) for layer in first]
        coding = "b" if result.get("act_coding") == "binary" else ""
        panels.append({"title": f"{result['network']} PA({result['weight_bases']},{result['act_bases']}{coding}): "
                                f"time per layer",
                       "xlabel": "ms (log scale)", "log": True, "layers": names, "series": series})
    return panels


def default_figure_size(panels):
    """(width, height) in inches: 5.5 per panel beside a column for the layer names, a row per layer."""
    rows = max(len(panel["layers"]) for panel in panels)
    return 3.0 + 5.5 * len(panels), _MARGIN_INCHES + _ROW_INCHES * rows


def save_panels(panels, path, figure_size=None, dpi=100, title=None):
    """Draw `panels` (see the module docstring) side by side and write them to `path` (.png or
    .svg) atomically. The picture is figure_size (inches, default `default_figure_size`) x dpi
    pixels. Raises PabnnError for another suffix, or when matplotlib is missing."""
    suffix = check_plot_path(path)
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    width, height = figure_size or default_figure_size(panels)
    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    shared = len({tuple(panel["layers"]) for panel in panels}) == 1
    axes = figure.subplots(1, len(panels), sharey=shared, squeeze=False)[0]
    for index, (axis, panel) in enumerate(zip(axes, panels)):
        _draw_panel(axis, panel, show_names=index == 0 or not shared)
    if title:
        figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=suffix[1:], dpi=dpi)
    write_atomically(path, lambda handle: handle.write(buffer.getvalue()), suffix)


def _draw_panel(axis, panel, show_names):
    layers, series = panel["layers"], panel["series"]
    height = 0.8 / len(series)
    for index, (label, values) in enumerate(series.items()):
        positions = [row + (index - (len(series) - 1) / 2) * height for row in range(len(layers))]
        kept = [(p, v) for p, v in zip(positions, values) if v is not None and (v > 0 or not panel["log"])]
        bars = axis.barh([p for p, _ in kept], [v for _, v in kept], height=height, label=label)
        if not panel["log"]:
            axis.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    if panel["log"]:
        axis.set_xscale("log")
    axis.set_yticks(range(len(layers)))
    if show_names:
        axis.set_yticklabels(layers, fontsize=8)
    else:  # the tick labels are shared with the first panel's axis: hide them, don't replace them
        axis.tick_params(labelleft=False)
    axis.set_ylim(len(layers) - 0.5, -0.5)  # first layer at the top
    axis.set_title(panel["title"])
    axis.set_xlabel(panel["xlabel"])
    axis.grid(axis="x", alpha=0.3)
    if len(series) > 1:
        axis.legend(fontsize=8, loc="best")
