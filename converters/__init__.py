"""pabnn.converters: PyTorch/ONNX models in, PA multi-base binary .pab models out."""
from .convert import ConvertedModel, convert
from .fitting import StaircaseFit, fit_weight_staircases
from .onnx_export import export_onnx
from .onnx_import import import_onnx
from .onnx_registry import supported_onnx_ops  # the converters register when onnx_import imports them
from .passes import fold_batchnorm

__all__ = ["ConvertedModel", "StaircaseFit", "convert", "export_onnx", "fit_weight_staircases", "fold_batchnorm",
           "import_onnx", "supported_onnx_ops"]
