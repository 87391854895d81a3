"""The `pabnn` command line: convert, run, report, export, ops.

`convert` and `export` need the converter extras (onnx, and torch for PyTorch models; imported
when the command runs); the other commands need only the engine.
"""
import argparse
import json
import os
import sys

import numpy as np

from .errors import PabnnError


def _convert(args):
    from pabnn.converters import convert
    from pabnn.converters.methods import DEFAULT_METHOD

    _check_output(args.output, [args.model, args.calibration], args.force)
    calibration = _load_array(args.calibration, "calibration")
    model = convert(args.model, calibration=calibration, weight_bases=args.weight_bases, act_bases=args.act_bases,
                    binarize=args.binarize, keep_float=args.keep_float,
                    binarize_depthwise=args.binarize_depthwise, min_fan_in=args.min_fan_in,
                    method=args.method or DEFAULT_METHOD, progress=not args.quiet,
                    act_coding=args.act_coding, integer=args.integer)
    model.save(args.output)
    for fit in model.fits:
        print(f"{fit['layer']}: weight relative error {fit['weight_relative_error']:.4f}, "
              f"activation relative error {fit['act_relative_error']:.4f}, "
              f"output SQNR {fit['output_sqnr_db']:.1f} dB")
    for layer in model.graph.metadata["converter"]["integer"]:
        grid = ", exact on the calibration data's grid" if layer["input_on_grid"] else ""
        print(f"{layer['layer']}: int8 layer, input scale {layer['input_scale']:.6g}, zero point "
              f"{layer['input_zero_point']}{grid}, output SQNR {layer['output_sqnr_db']:.1f} dB")
    for refit in model.graph.metadata["converter"]["refitted_float"]:
        print(f"{refit['layer']}: float layer refitted (ridge {refit['ridge']:g}), output SQNR "
              f"{refit['trained_output_sqnr_db']:.1f} -> {refit['output_sqnr_db']:.1f} dB")
    print(f"wrote {args.output} ({os.path.getsize(args.output):,} bytes, {len(model.fits)} binarized layers)")


def _export(args):
    from pabnn.converters import export_onnx

    _check_output(args.output, [args.model], args.force)
    try:
        export_onnx(args.model, args.output, progress=not args.quiet)
    except OSError as error:
        raise PabnnError(f"cannot write {args.output}: {error.strerror or error}") from None
    print(f"wrote {args.output} ({os.path.getsize(args.output):,} bytes): a float ONNX emulation of {args.model}")


_AMX_CHOICES = {"auto": None, "on": True, "off": False}
_AMX_HELP = ("binary layers on AMX-INT8 tiles where they take fewer passes (Session's amx option): auto (default) "
             "where this CPU allows, on (an error where it does not), off (the AND-popcount kernels only)")


def _amx_option(choice):
    """The Session's amx value of an --amx choice; `on` where AMX is not available is a PabnnError."""
    from . import amx

    if choice == "on" and not amx.available():
        raise PabnnError("--amx on: AMX-INT8 tiles are not available here (the CPU has no AMX-INT8, numba "
                         "compiles for another CPU, or the OS refused the tile permission)")
    return _AMX_CHOICES[choice]


def _run(args):
    from .session import load

    _check_output(args.output, [args.model, args.input], args.force)
    session = load(args.model, threads=args.threads, amx=_amx_option(args.amx))
    if len(session.input_names) != 1:
        raise PabnnError(f"the model has inputs {session.input_names}; `pabnn run` feeds single-input models")
    (output,) = session.run([session.output_names[0]], {session.input_names[0]: _load_array(args.input, "input")})
    _save_array_atomically(args.output, output)
    print(f"wrote {args.output}: {session.output_names[0]} {list(output.shape)} float32")


def _report(args):
    from .pab_format import load_graph
    from .report import format_report, model_report

    if args.plot:
        _check_plot_output(args.plot, [args.model, args.calibration, args.source], args.force)
    graph = load_graph(args.model)
    report = model_report(graph, file_bytes=os.path.getsize(args.model))
    if args.calibration:
        report["layer_sqnr"] = _layer_sqnr(graph, args)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.calibration and not args.json:
        print("\nper binarized layer (and float layer refitted by calibration), output SQNR vs the float network "
              f"({'on ' + args.calibration if args.source else 'measured at conversion'}):")
        for row in report["layer_sqnr"]:
            print(f"  {row['layer']:40s} {row['kind']:8s} {row['sqnr_db']:6.1f} dB")
    if args.plot:
        from .plots import report_panels, save_panels

        save_panels(report_panels(report, report.get("layer_sqnr")), args.plot, title=os.path.basename(args.model))
        _note(args, f"wrote {args.plot}")


def _check_plot_output(path, inputs, force):
    from .plots import check_plot_path

    check_plot_path(path)
    _check_output(path, [name for name in inputs if name], force)


def _note(args, message):
    """Feedback that is not the command's result: on stderr, silenced by --quiet."""
    if not args.quiet:
        print(message, file=sys.stderr)


def _layer_sqnr(graph, args):
    """Per-layer output SQNR: measured on --calibration against --source, or (without a source)
    the values convert() measured on its own calibration data, stored in the file."""
    if not args.source:
        stored = graph.metadata.get("fits", [])
        if not stored or "output_sqnr_db" not in stored[0]:
            raise PabnnError(f"{args.model} stores no calibration SQNR; pass --source model.onnx")
        refits = graph.metadata.get("converter", {}).get("refitted_float", [])
        order = {node.name: index for index, node in enumerate(graph.nodes)}
        rows = ([{"layer": fit["layer"], "kind": "PA", "sqnr_db": fit["output_sqnr_db"]} for fit in stored]
                + [{"layer": refit["layer"], "kind": "refit", "sqnr_db": refit["output_sqnr_db"]} for refit in refits])
        return sorted(rows, key=lambda row: order.get(row["layer"], len(order)))
    from pabnn.converters.diagnostics import layer_sqnr, load_float_graph, single_input_feeds

    feeds = single_input_feeds(graph, _load_array(args.calibration, "calibration"), "`pabnn report`")
    return layer_sqnr(graph, load_float_graph(args.source), feeds, progress=not args.quiet)


def _evaluate(args):
    from pabnn.converters.diagnostics import classification_metrics, load_float_graph, single_input_feeds

    from .session import load

    session = load(args.model, threads=args.threads)
    feeds = single_input_feeds(session.graph, _load_array(args.inputs, "inputs"), "`pabnn evaluate`")
    labels = _load_array(args.labels, "labels") if args.labels else None
    samples = next(iter(feeds.values())).shape[0]
    if labels is not None and labels.ravel().shape[0] != samples:  # refused before the runs
        raise PabnnError(f"evaluate {args.model}: {labels.ravel().shape[0]} labels for {samples} samples")
    logits = _run_in_batches(session, feeds, "running the model", args.quiet)
    float_logits = None
    if args.source:
        from .session import Session

        float_session = Session(load_float_graph(args.source), threads=args.threads)
        float_logits = _run_in_batches(float_session, feeds, "running the float model", args.quiet)
    try:
        metrics = classification_metrics(logits, labels, float_logits)
    except ValueError as error:
        raise PabnnError(f"evaluate {args.model}: {error}") from None
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    print(f"{args.model}: {metrics['samples']} samples, {metrics['classes']} classes")
    for key, title in (("top1", "top-1"), ("top5", "top-5"), ("top1_agreement", "top-1 agreement with float"),
                       ("logit_cosine", "mean logit cosine vs float")):
        if key in metrics:
            value = metrics[key]
            print(f"  {title}: {100 * value:.2f}%" if key != "logit_cosine" else f"  {title}: {value:.4f}")
    if "top1_change" in metrics:
        print(f"  top-1 change vs float ({100 * metrics['float_top1']:.2f}%): {100 * metrics['top1_change']:+.2f} "
              f"points, 95% interval +-{100 * metrics['top1_change_ci95']:.2f} ({metrics['gained']} samples gained, "
              f"{metrics['lost']} lost)")


EVALUATE_BATCH = 256


def _run_in_batches(session, feeds, description, quiet):
    """The first output of `session` on `feeds`, run EVALUATE_BATCH samples at a time under a
    progress bar on stderr (none with quiet)."""
    from tqdm.auto import tqdm

    (array,) = feeds.values()
    parts = []
    with tqdm(total=array.shape[0], desc=description, unit="sample", disable=quiet, leave=False) as bar:
        for start in range(0, array.shape[0], EVALUATE_BATCH):
            batch = {name: value[start:start + EVALUATE_BATCH] for name, value in feeds.items()}
            (output,) = session.run([session.output_names[0]], batch)
            parts.append(output)
            bar.update(output.shape[0])
    if not parts:  # batch 0
        (output,) = session.run([session.output_names[0]], feeds)
        return output
    return np.concatenate(parts)


def _ops(args):
    from .ops import registered_ops

    if args.markdown:
        print(operators_markdown(), end="")
        return
    for op in registered_ops():
        print(f"{op.name:20s} {op.summary}")


def operators_markdown():
    """docs/operators.md: the engine's ops and the ONNX converters, generated from the registries."""
    from pabnn.converters import supported_onnx_ops
    from pabnn.converters.onnx_opset_upgrade import FIRST_UPGRADED_OPSET, REWRITTEN_OPS, TARGET_OPSET

    from .ops import registered_ops

    lines = ["# Operators", "", "Generated by `pabnn ops --markdown` from the registries; do not edit by hand.", "",
             "## Engine ops", "", "| op | computes |", "| --- | --- |"]
    lines += [f"| {op.name} | {op.summary} |" for op in registered_ops()]
    rewritten = ", ".join(f"{old} becomes {new}" for old, new in sorted(REWRITTEN_OPS.items()))
    lines += ["", "## ONNX import", "",
              f"Models at opsets {FIRST_UPGRADED_OPSET}-{TARGET_OPSET - 1} are upgraded to opset {TARGET_OPSET} first "
              f"(`converters/onnx_opset_upgrade.py`; {rewritten} there), then converted as below.", "",
              "| ONNX op | opsets |", "| --- | --- |"]
    for op_type, ranges in supported_onnx_ops().items():
        lines.append(f"| {op_type} | {', '.join(f'{first}-{last}' for first, last in ranges)} |")
    return "\n".join(lines) + "\n"


def _bench(args):
    from pabnn.converters.bench import OpenVinoPeer, bench_case, default_openvino_script, format_case, format_summary

    if args.plot:
        if args.startup:
            raise PabnnError("--plot draws the per-layer profile, which --startup does not measure")
        _check_plot_output(args.plot, [], args.force)
    if args.startup:
        from pabnn.converters.bench import startup_seconds

        times = startup_seconds(progress=not args.quiet)
        print(json.dumps(times) if args.json else
              f"resnet18 PA(1,1) import + load + first inference in a new process: cold (empty numba cache) "
              f"{times['cold']:.2f} s, warm {times['warm']:.2f} s (medians of 3)")
        return
    openvino = None
    if args.openvino_python:
        openvino = OpenVinoPeer(args.openvino_python, args.openvino_script or default_openvino_script())
    rounds = args.rounds or (3 if openvino else 1)
    results = []
    for network in args.network:
        for weight_bases, act_bases in args.bases:
            result = bench_case(network, weight_bases, act_bases, threads_list=args.threads, repeats=args.repeats,
                                act_coding=args.act_coding, openvino=openvino, rounds=rounds,
                                progress=not args.quiet, integer=args.integer, amx=_amx_option(args.amx))
            results.append(result)
            if not args.json:
                print(format_case(result), flush=True)
    if openvino is not None and openvino.error:
        print(f"pabnn bench: OpenVINO peer left out: {openvino.error}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n" + format_summary(results))
    if args.plot:
        from .plots import profile_panels, save_panels

        save_panels(profile_panels(results), args.plot, title="pabnn bench: per-layer profile (medians)")
        _note(args, f"wrote {args.plot}")


def _warmup(args):
    import time

    from .warmup import warmup

    start = time.perf_counter()
    compiled = warmup()
    print(f"compiled or loaded {compiled} kernels in {time.perf_counter() - start:.1f} s")


def _bases(text):
    try:
        weight_bases, act_bases = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected M,N (for example 2,2), found {text!r}") from None
    return weight_bases, act_bases


def _check_output(output, inputs, force):
    """Refuse to overwrite an input, or an existing file without --force, before any work."""
    if any(os.path.realpath(output) == os.path.realpath(path) for path in inputs):
        raise PabnnError(f"output {output} would overwrite an input")
    if os.path.exists(output) and not force:
        raise PabnnError(f"output {output} exists; pass --force to replace it")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise PabnnError(f"output {output}: folder {folder} does not exist")


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, found {text}")
    return value


def _load_array(path, what):
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise PabnnError(f"{what} {path}: not a readable .npy file: {error}") from None
    if not isinstance(array, np.ndarray):
        raise PabnnError(f"{what} {path}: expected a .npy array, found a {type(array).__name__} (use np.save)")
    return array


def _save_array_atomically(path, array):
    temporary = f"{path}.tmp-{os.getpid()}.npy"
    try:
        with open(temporary, "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def build_parser():
    parser = argparse.ArgumentParser(prog="pabnn", description="PA multi-base binary neural networks on CPU")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert an ONNX model into a .pab file")
    convert.add_argument("model", help="ONNX file")
    convert.add_argument("-o", "--output", required=True, help="the .pab file to write")
    convert.add_argument("--calibration", required=True, help=".npy array of real inputs [batch, ...]")
    convert.add_argument("--weight-bases", type=int, default=4, help="M, weight bit-planes (default 4)")
    convert.add_argument("--act-bases", type=int, default=5, help="N, activation bit-planes (default 5)")
    convert.add_argument("--binarize", nargs="+", metavar="NODE",
                         help="layers to binarize, names or glob patterns (default: all but first and last)")
    convert.add_argument("--keep-float", nargs="+", metavar="NODE", help="layers to keep in float (names or patterns)")
    convert.add_argument("--binarize-depthwise", action="store_true", help="binarize depthwise convs too")
    convert.add_argument("--min-fan-in", type=int, default=64, metavar="K",
                         help="by default keep float the layers with fewer than K inputs per output value "
                              "((C/group)*kh*kw; default 64)")
    convert.add_argument("--integer", nargs="+", metavar="PATTERN",
                         help="layers to run as exact 8-bit integer layers (int8 weights, uint8 input), names or "
                              "glob patterns")
    convert.add_argument("--method", default=None,
                         help="calibration method: lloyd, sequential, regression, rounding, equalized, selected "
                              "(the default) or propagated; see pabnn.converters.methods")
    convert.add_argument("--act-coding", choices=["thermometer", "binary"], default="thermometer",
                         help="activation code of the binarized layers: thermometer (default, N planes) or binary "
                              "(levels on a uniform grid, ceil(log2(N+1)) planes)")
    convert.add_argument("--force", action="store_true", help="replace an existing output file")
    convert.add_argument("-q", "--quiet", action="store_true", help="no progress bars on stderr")
    convert.set_defaults(handler=_convert)

    export = commands.add_parser("export", help="write a .pab model as a standard-op float ONNX model (an emulation "
                                                "for inspection and other runtimes; not faster)")
    export.add_argument("model", help=".pab file")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--force", action="store_true", help="replace an existing output file")
    export.add_argument("-q", "--quiet", action="store_true", help="no progress bars on stderr")
    export.set_defaults(handler=_export)

    run = commands.add_parser("run", help="run a .pab model on a .npy input")
    run.add_argument("model")
    run.add_argument("--input", required=True, help=".npy input [batch, ...]")
    run.add_argument("--output", required=True, help=".npy file for the first model output")
    run.add_argument("--threads", type=_positive_int, default=None, help="kernel threads (default: all cores)")
    run.add_argument("--amx", choices=list(_AMX_CHOICES), default="auto", help=_AMX_HELP)
    run.add_argument("--force", action="store_true", help="replace an existing output file")
    run.set_defaults(handler=_run)

    report = commands.add_parser("report", help="per-layer sizes and operation counts of a .pab model")
    report.add_argument("model")
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report.add_argument("--calibration", help=".npy inputs: also print each binarized layer's output SQNR vs float")
    report.add_argument("--source", help="the float ONNX model the .pab was converted from (for --calibration)")
    report.add_argument("--plot", metavar="FILE", help="also draw the per-layer bytes, operations (and with "
                                                       "--calibration SQNR) into FILE, .png or .svg (needs "
                                                       "pip install \"pabnn[plot]\")")
    report.add_argument("--force", action="store_true", help="replace an existing plot file")
    report.add_argument("-q", "--quiet", action="store_true", help="no progress bars on stderr")
    report.set_defaults(handler=_report)

    evaluate = commands.add_parser("evaluate", help="top-1/top-5 of a .pab classifier, and agreement with float")
    evaluate.add_argument("model")
    evaluate.add_argument("--inputs", required=True, help=".npy inputs [batch, ...]")
    evaluate.add_argument("--labels", help=".npy integer labels [batch]")
    evaluate.add_argument("--source", help="the float ONNX model: also top-1 agreement and logit cosine vs float")
    evaluate.add_argument("--threads", type=_positive_int, default=None, help="kernel threads (default: all cores)")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.add_argument("-q", "--quiet", action="store_true", help="no progress bars on stderr")
    evaluate.set_defaults(handler=_evaluate)

    bench = commands.add_parser("bench", help="pabnn vs ONNX Runtime float32 vs a popcount roofline loop")
    bench.add_argument("--network", nargs="+", choices=["conv3x3", "resnet18"], default=["conv3x3", "resnet18"])
    bench.add_argument("--bases", nargs="+", type=_bases, default=[(1, 1), (2, 2), (4, 5)], metavar="M,N")
    bench.add_argument("--threads", nargs="+", type=_positive_int, default=[1, 2])
    bench.add_argument("--repeats", type=_positive_int, default=10, help="timed runs per engine (median)")
    bench.add_argument("--act-coding", choices=["thermometer", "binary"], default="thermometer",
                       help="activation code of the binarized layers (see pabnn convert --act-coding)")
    bench.add_argument("--integer", nargs="+", metavar="PATTERN",
                       help="layers to run as 8-bit integer layers (see pabnn convert --integer), e.g. conv1, "
                            "ResNet-18's stem")
    bench.add_argument("--amx", choices=list(_AMX_CHOICES), default="auto", help=_AMX_HELP)
    bench.add_argument("--json", action="store_true", help="print JSON instead of tables")
    bench.add_argument("--startup", action="store_true", help="measure cold and warm start times instead")
    bench.add_argument("--plot", metavar="FILE", help="also draw each case's per-layer profile (ms per layer) into "
                                                      "FILE, .png or .svg (needs pip install \"pabnn[plot]\")")
    bench.add_argument("--force", action="store_true", help="replace an existing plot file")
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress bars on stderr")
    bench.add_argument("--openvino-python", default=os.environ.get("PABNN_OPENVINO_PYTHON"), metavar="PYTHON",
                       help="the python of a venv with openvino (pip install openvino==2026.4.1 numpy): also time "
                            "OpenVINO's binary Bi-Real-18 / binary conv in a subprocess, alternating with pabnn "
                            "(default: $PABNN_OPENVINO_PYTHON; unset: no OpenVINO column)")
    bench.add_argument("--openvino-script", default=os.environ.get("PABNN_OPENVINO_SCRIPT"), metavar="PATH",
                       help="the peer script (default: $PABNN_OPENVINO_SCRIPT, else ../shared/peers/bench_ov.py "
                            "beside the repository)")
    bench.add_argument("--rounds", type=_positive_int, default=None,
                       help="rounds of alternation (each: --repeats runs per engine and thread count, then one "
                            "OpenVINO run); default 3 with --openvino-python, else 1")
    bench.set_defaults(handler=_bench)

    warmup = commands.add_parser("warmup", help="compile every kernel into numba's on-disk cache")
    warmup.set_defaults(handler=_warmup)

    ops = commands.add_parser("ops", help="list the registered ops")
    ops.add_argument("--markdown", action="store_true", help="print docs/operators.md (needs pabnn.converters)")
    ops.set_defaults(handler=_ops)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (PabnnError, OSError) as error:
        print(f"pabnn {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
