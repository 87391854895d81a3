"""What `pabnn export` gives in onnxruntime: the exported digits ResNet against its float source
(both in onnxruntime) and against pabnn, at PA(1,1), (2,2) and (4,5).

    python benchmarks/onnx_export.py [--threads 1] [--repeats 15]

Prints, per PA(M,N), medians of `repeats` runs on 256 evaluation digits, measured side by side in
one process: exported model / float source (both onnxruntime), pabnn Session / exported model, and
how many samples' outputs differ beyond FLOAT32_RTOL between pabnn and the export (a threshold
comparison that float32 rounding moved; tests/tolerances.py, EXPORT_FLIPPED_SAMPLE_FRACTION).
The model is converted with the cheap "lloyd" calibration on 64 images.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime

from pabnn.converters import convert, export_onnx
from pabnn.engine import Session

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
FLOAT32_RTOL = 2e-5  # tests/tolerances.py


def median_seconds(run, repeats):
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    with np.load(DATA / "digits_sample.npz") as sample:
        calibration, x = sample["calibration"][:64], sample["evaluation"][:256]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    source = str(DATA / "digits_resnet.onnx")
    float_session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    float_feeds = {float_session.get_inputs()[0].name: x}
    for weight_bases, act_bases in ((1, 1), (2, 2), (4, 5)):
        graph = convert(source, calibration=calibration, weight_bases=weight_bases, act_bases=act_bases,
                        method="lloyd", progress=False).graph
        exported = onnxruntime.InferenceSession(export_onnx(graph).SerializeToString(), options,
                                                providers=["CPUExecutionProvider"])
        session = Session(graph, threads=args.threads)
        feeds = {graph.inputs[0].name: x}
        float_time = median_seconds(lambda: float_session.run(None, float_feeds), args.repeats)
        exported_time = median_seconds(lambda: exported.run(None, feeds), args.repeats)
        pabnn_time = median_seconds(lambda: session.run(None, feeds), args.repeats)
        (ours,), (theirs,) = session.run(None, feeds), exported.run(None, feeds)
        scale = max(1.0, float(np.abs(ours).max()))
        off = int((np.abs(ours - theirs).max(axis=1) > FLOAT32_RTOL * scale).sum())
        agree = float(np.mean(ours.argmax(axis=1) == theirs.argmax(axis=1)))
        print(f"PA({weight_bases},{act_bases}): exported / float source {exported_time / float_time:.2f}x, "
              f"pabnn / exported {pabnn_time / exported_time:.2f}x, top-1 agreement {agree:.4f}, "
              f"{off} of {len(x)} samples beyond FLOAT32_RTOL", flush=True)


if __name__ == "__main__":
    main()
