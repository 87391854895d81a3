"""pabnn: convert trained CNNs into piecewise-approximated (PA) multi-base binary networks and run
them on bit-packed popcount kernels.

    import pabnn
    model = pabnn.convert("model.onnx", calibration=images, weight_bases=2, act_bases=2)
    model.save("model.pab")
    session = pabnn.load("model.pab")            # like onnxruntime.InferenceSession
    (logits,) = session.run(None, {"input": images})

`pabnn.engine` runs .pab files with numpy and numba alone; `pabnn.converters` makes them (onnx,
and torch for PyTorch modules). `pabnn.convert` imports the converters on first use, so a device
that only runs models never imports onnx. Every error pabnn raises is a `pabnn.PabnnError`.
"""
from importlib.metadata import PackageNotFoundError, version

from .engine import ConversionError, FormatError, GraphError, InputError, PabnnError, Session, load

try:
    __version__ = version("pabnn")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["ConversionError", "FormatError", "GraphError", "InputError", "PabnnError", "Session", "__version__",
           "convert", "load"]


def __getattr__(name):
    if name == "convert":
        from .converters import convert
        return convert
    raise AttributeError(f"module 'pabnn' has no attribute {name!r}")
