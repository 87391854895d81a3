"""pabnn.engine: load a .pab file and run it on bit-packed popcount kernels.

Needs numpy and numba only; never imports torch or onnx.
"""
from .errors import ConversionError, FormatError, GraphError, InputError, PabnnError
from .graph import Graph, Node, TensorInfo, run_reference
from .ops import registered_ops
from .pab_format import load_graph, save
from .report import format_report, model_report
from .session import Session, load

__all__ = [
    "ConversionError", "FormatError", "Graph", "GraphError", "InputError", "Node", "PabnnError", "Session",
    "TensorInfo", "format_report", "load", "load_graph", "model_report", "registered_ops", "run_reference", "save",
]
