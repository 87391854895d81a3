"""Convert the bundled digits ResNet to PA multi-base binary networks, run them, print the savings.

The model (examples/data/digits_resnet.onnx) is a small ResNet with BatchNorm and residual
adds, trained on real MNIST digits by examples/train_digits_resnet.py. The sample file holds
256 calibration images from its training split and 1000 held-out evaluation images.

For each PA(M, N) configuration the script converts the ONNX file (calibrating the activation
staircases on the 256 images), saves and reloads the .pab file, runs the 1000 evaluation images
on the packed-bit kernels and prints top-1 accuracy next to the float model's, with the model's
size and operation counts:

    python examples/digits_resnet.py [--bases 1,1 2,2 4,5] [--out-dir DIR]
"""
import argparse
import os
import tempfile
import time

import numpy as np

from pabnn.converters import convert, fold_batchnorm, import_onnx
from pabnn.engine import Session, load, model_report

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
MODEL = os.path.join(DATA, "digits_resnet.onnx")
SAMPLE = os.path.join(DATA, "digits_sample.npz")


def accuracy(session, images, labels):
    (logits,) = session.run(None, {session.input_names[0]: images})
    return float(np.mean(logits.argmax(axis=1) == labels))


def parse_bases(text):
    weight_bases, act_bases = (int(v) for v in text.split(","))
    return weight_bases, act_bases


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bases", nargs="+", type=parse_bases, default=[(1, 1), (2, 2), (4, 5)],
                        metavar="M,N", help="PA configurations to convert (default: 1,1 2,2 4,5)")
    parser.add_argument("--out-dir", default=None, help="where to write the .pab files (default: a temp folder)")
    args = parser.parse_args()

    sample = np.load(SAMPLE)
    images, labels = sample["evaluation"], sample["evaluation_labels"]
    import onnx

    float_graph = fold_batchnorm(import_onnx(onnx.load(MODEL)))
    float_accuracy = accuracy(Session(float_graph), images, labels)
    float_bytes = os.path.getsize(MODEL)
    print(f"float model: {MODEL} ({float_bytes:,} bytes), top-1 {100 * float_accuracy:.1f}% "
          f"on {len(labels)} held-out digits")
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="pabnn-digits-")
    os.makedirs(out_dir, exist_ok=True)

    header = (f"{'PA(M,N)':8s} {'top-1':>7s} {'vs float':>9s} {'file bytes':>11s} {'params':>13s} "
              f"{'OPs/sample':>11s} {'fewer OPs':>10s} {'convert s':>9s} {'run s':>6s}")
    print(header)
    print("-" * len(header))
    for weight_bases, act_bases in args.bases:
        start = time.perf_counter()
        model = convert(MODEL, calibration=sample["calibration"], weight_bases=weight_bases, act_bases=act_bases)
        path = os.path.join(out_dir, f"digits_resnet_pa{weight_bases}{act_bases}.pab")
        model.save(path)
        converted = time.perf_counter() - start
        session = load(path)
        start = time.perf_counter()
        top1 = accuracy(session, images, labels)
        ran = time.perf_counter() - start
        totals = model_report(session.graph, file_bytes=os.path.getsize(path))["totals"]
        print(f"PA({weight_bases},{act_bases})  {100 * top1:6.1f}% {100 * (top1 - float_accuracy):+8.1f}  "
              f"{totals['file_bytes']:11,d} {totals['memory_saving']:6.1f}x less  {totals['ops'] / 1e6:9.2f}M "
              f"{totals['ops_saving']:9.1f}x {converted:9.1f} {ran:6.1f}")
    print(f"\nfloat32 model: {totals['float_flops'] / 1e6:.2f}M FLOPs/sample; params: float32 bytes of the "
          f"weights vs bytes stored in the .pab; OPs = FLOPs + BOPs/64.")
    print(f"first and last layers stay float; .pab files in {out_dir}; "
          f"per-layer detail: pabnn report {path}")


if __name__ == "__main__":
    main()
