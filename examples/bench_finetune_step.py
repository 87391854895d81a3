"""Speed of one PA fine-tuning step (forward, backward, Adam) on the bundled digits ResNet, against
two peers measured in the same run: the same step with the reference quantizer
(pabnn.converters.torch.threshold_code_reference instead of ThresholdCode), and a training step of
the float network. The three alternate for --repeats rounds; medians are printed.

    pip install ".[examples]"
    python examples/bench_finetune_step.py [--bases 2,2] [--batch 64] [--threads 2] [--repeats 6]
"""
import argparse
import os
import time

import numpy as np
import torch
from torch.nn import functional

from pabnn.converters import torch as pabnn_torch

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def reference_quantized_input(layer, x):
    return pabnn_torch.threshold_code_reference(x, layer.act_thresholds.to(x.dtype), layer.act_steps.to(x.dtype),
                                                layer.act_lowest.to(x.dtype))


def step_milliseconds(model, images, labels, steps=5):
    """Mean time of `steps` training steps (after one untimed), in ms."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        loss = functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bases", default="2,2", metavar="M,N")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    weight_bases, act_bases = (int(v) for v in args.bases.split(","))
    torch.set_num_threads(args.threads)
    sample = np.load(os.path.join(DATA, "digits_sample.npz"))
    source = os.path.join(DATA, "digits_resnet.onnx")
    prepared = pabnn_torch.prepare(source, calibration=sample["calibration"], weight_bases=weight_bases,
                                   act_bases=act_bases)
    float_model = pabnn_torch.prepare(source, calibration=sample["calibration"], binarize=[])
    images = torch.from_numpy(np.resize(sample["calibration"], (args.batch,) + sample["calibration"].shape[1:]))
    labels = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(0))
    fast = pabnn_torch.PALayer.quantized_input
    times = {"ThresholdCode": [], "reference quantizer": [], "float network": []}
    try:
        for _ in range(args.repeats):
            pabnn_torch.PALayer.quantized_input = fast
            times["ThresholdCode"].append(step_milliseconds(prepared, images, labels))
            pabnn_torch.PALayer.quantized_input = reference_quantized_input
            times["reference quantizer"].append(step_milliseconds(prepared, images, labels))
            times["float network"].append(step_milliseconds(float_model, images, labels))
    finally:
        pabnn_torch.PALayer.quantized_input = fast
    medians = {name: float(np.median(values)) for name, values in times.items()}
    print(f"PA({weight_bases},{act_bases}) fine-tuning step, batch {args.batch}, {args.threads} threads, "
          f"median of {args.repeats}:")
    for name, value in medians.items():
        print(f"  {name:20s} {value:7.1f} ms/step  ({value / medians['ThresholdCode']:.2f}x ThresholdCode)")


if __name__ == "__main__":
    main()
