"""A MobileNetV3 from elsewhere, float and converted, against ONNX Runtime float32: PaddleOCR's
text-direction classifier as the rapidocr-onnxruntime wheel ships it (the model of
examples/ocr_text_direction.py: depthwise and 1x1 convs, hard-swish, squeeze-and-excitation),
on random crops [batch, 3, 48, 192].

- float pabnn: the ONNX file imported as it is (`import_onnx`, no conversion);
- PA(M,N): `convert` with default settings (depthwise and narrow convs stay float), calibrated on
  16 random crops (the cost of a run does not depend on the calibration's content);
- ONNX Runtime: the ONNX file at the same thread count, spinning off.

For each thread count and batch size the engines alternate over --rounds rounds of runs in a row;
the medians of the rounds' medians are printed, and ONNX Runtime's time over each pabnn model's.

    pip install -e ".[examples]"
    python benchmarks/mobilenet_classifier.py [--batch 1 32] [--threads 1 2] [--rounds 5] [--bases 2,2]
"""
import argparse
import importlib.util
import os

import numpy as np
import onnx
import onnxruntime

from onnx_export import median_seconds  # benchmarks/onnx_export.py, beside this script
from pabnn.converters import convert, import_onnx
from pabnn.engine.session import Session

HEIGHT, WIDTH = 48, 192


def model_path():
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        raise SystemExit('the classifier ships in the rapidocr-onnxruntime wheel: pip install -e ".[examples]"')
    return os.path.join(os.path.dirname(spec.origin), "models", "ch_ppocr_mobile_v2.0_cls_infer.onnx")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bases", default="2,2", help="M,N of the converted model (default 2,2)")
    arguments = parser.parse_args()
    weight_bases, act_bases = (int(v) for v in arguments.bases.split(","))
    path = model_path()
    rng = np.random.default_rng(0)
    float_graph = import_onnx(onnx.load(path), example_shapes={"x": [None, 3, HEIGHT, WIDTH]})
    calibration = rng.uniform(-1, 1, size=(16, 3, HEIGHT, WIDTH)).astype(np.float32)
    converted = convert(path, calibration=calibration, weight_bases=weight_bases, act_bases=act_bases, progress=False)
    label = f"PA({weight_bases},{act_bases})"
    print(f"{'batch':>5} {'threads':>7} {'float pabnn ms':>14} {label + ' ms':>11} {'ONNX Runtime ms':>15} "
          f"{'ORT/float':>9} {'ORT/' + label:>12}")
    for threads in arguments.threads:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        runtime = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        engines = {"float": Session(float_graph, threads=threads), label: converted.session(threads=threads)}
        for batch in arguments.batch:
            x = rng.uniform(-1, 1, size=(batch, 3, HEIGHT, WIDTH)).astype(np.float32)
            runs = {name: (lambda session=session: session.run(None, {session.input_names[0]: x}))
                    for name, session in engines.items()}
            runs["ORT"] = lambda: runtime.run(None, {runtime.get_inputs()[0].name: x})
            rounds = {name: [] for name in runs}
            for _ in range(arguments.rounds):
                for name, run in runs.items():
                    rounds[name].append(1e3 * median_seconds(run, 11 if batch == 1 else 5))
            ms = {name: float(np.median(values)) for name, values in rounds.items()}
            print(f"{batch:5d} {threads:7d} {ms['float']:14.2f} {ms[label]:11.2f} {ms['ORT']:15.2f} "
                  f"{ms['ORT'] / ms['float']:8.2f}x {ms['ORT'] / ms[label]:11.2f}x", flush=True)


if __name__ == "__main__":
    main()
