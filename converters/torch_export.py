"""torch.nn.Module -> onnx.ModelProto, with a dynamic batch axis, in eval mode."""
import io
import warnings

import onnx

from pabnn.engine.errors import ConversionError

from .dynamic_weights import exportable_run_time_conv_weights
from .onnx_registry import EXPORT_OPSET


def export_to_onnx(module, example_input):
    """Export `module` (in eval mode) with the TorchScript exporter, falling back to the dynamo
    exporter where the former fails. example_input: a tensor [batch, ...]. Convolutions with
    per-sample run-time weights are exported as converters/dynamic_weights.py describes.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ConversionError(f"expected a torch.nn.Module, found {type(module).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise ConversionError("a torch.nn.Module needs example_input=<torch.Tensor [batch, ...]> to be exported")
    training_flags = {name: sub.training for name, sub in module.named_modules()}
    module.eval()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), exportable_run_time_conv_weights():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, (example_input,), buffer, dynamo=False, opset_version=EXPORT_OPSET,
                                  input_names=["input"], output_names=["output"],
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
            except Exception:  # the TorchScript exporter rejects some modules; try dynamo
                buffer = io.BytesIO()
                batch = torch.export.Dim("batch")
                program = torch.onnx.export(module, (example_input,), dynamo=True, opset_version=EXPORT_OPSET,
                                            input_names=["input"], output_names=["output"],
                                            dynamic_shapes=({0: batch},), verbose=False)
                program.save(buffer)
    except Exception as error:
        raise ConversionError(f"torch.onnx.export failed for {type(module).__name__}: {error}") from error
    finally:
        for name, sub in module.named_modules():
            sub.training = training_flags[name]
    return onnx.load_from_string(buffer.getvalue())
