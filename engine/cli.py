"""The `pabnn` command line: convert, run, report, ops.

`convert` needs the converter extras (onnx, and torch for PyTorch models); the other commands
need only the engine.
"""
import argparse
import json
import os
import sys

import numpy as np

from .errors import PabnnError


def _convert(args):
    from pabnn.converters import convert

    _check_output(args.output, [args.model, args.calibration], args.force)
    calibration = _load_array(args.calibration, "calibration")
    model = convert(args.model, calibration=calibration, weight_bases=args.weight_bases, act_bases=args.act_bases,
                    binarize=args.binarize, keep_float=args.keep_float)
    model.save(args.output)
    for fit in model.fits:
        print(f"{fit['layer']}: weight relative error {fit['weight_relative_error']:.4f}, "
              f"activation relative error {fit['act_relative_error']:.4f}")
    print(f"wrote {args.output} ({os.path.getsize(args.output):,} bytes, {len(model.fits)} binarized layers)")


def _run(args):
    from .session import load

    _check_output(args.output, [args.model, args.input], args.force)
    session = load(args.model, threads=args.threads)
    if len(session.input_names) != 1:
        raise PabnnError(f"the model has inputs {session.input_names}; `pabnn run` feeds single-input models")
    (output,) = session.run([session.output_names[0]], {session.input_names[0]: _load_array(args.input, "input")})
    _save_array_atomically(args.output, output)
    print(f"wrote {args.output}: {session.output_names[0]} {list(output.shape)} float32")


def _report(args):
    from .pab_format import load_graph
    from .report import format_report, model_report

    report = model_report(load_graph(args.model), file_bytes=os.path.getsize(args.model))
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def _ops(args):
    from .ops import registered_ops

    for op in registered_ops():
        print(f"{op.name:20s} {op.summary}")


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
        np.save(temporary, array)
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
    convert.add_argument("--binarize", nargs="+", metavar="NODE", help="layers to binarize (default: all but first and last)")
    convert.add_argument("--keep-float", nargs="+", metavar="NODE", help="layers to keep in float")
    convert.add_argument("--force", action="store_true", help="replace an existing output file")
    convert.set_defaults(handler=_convert)

    run = commands.add_parser("run", help="run a .pab model on a .npy input")
    run.add_argument("model")
    run.add_argument("--input", required=True, help=".npy input [batch, ...]")
    run.add_argument("--output", required=True, help=".npy file for the first model output")
    run.add_argument("--threads", type=_positive_int, default=None, help="kernel threads (default: all cores)")
    run.add_argument("--force", action="store_true", help="replace an existing output file")
    run.set_defaults(handler=_run)

    report = commands.add_parser("report", help="per-layer sizes and operation counts of a .pab model")
    report.add_argument("model")
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report.set_defaults(handler=_report)

    ops = commands.add_parser("ops", help="list the registered ops")
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
