"""convert(): a PyTorch module or ONNX model in, a PA multi-base binary Graph out."""
import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from pabnn.engine.bits import ACT_CODINGS
from pabnn.engine.errors import ConversionError
from pabnn.engine.graph import Graph
from pabnn.engine.pab_format import save as save_graph
from pabnn.engine.session import Session

from .binary_import import IMPORTED_OPS, import_binary_layers
from .onnx_import import import_onnx
from .calibration import calibrate
from .methods import DEFAULT_METHOD, METHODS
from .dynamic_weights import factor_dynamic_weights
from .integer import choose_integer_layers, require_calibration
from .passes import choose_layers_to_binarize, fold_batchnorm


@dataclass
class ConvertedModel:
    """The result of `convert`: the graph, one fit report per binarized layer, and `save`."""

    graph: Graph
    fits: list = field(default_factory=list)
    float_graph: Graph = None  # the imported float graph (BatchNorm folded) it was calibrated against
    # {layer: {"weight": the float weights Qw approximates, "thresholds": Qw thresholds [O, M]}}
    latent_weights: dict = field(default_factory=dict)

    def save(self, path):
        """Write the model to a .pab file (atomically)."""
        save_graph(self.graph, path)

    def session(self, threads=None):
        return Session(self.graph, threads=threads)


def convert(model, *, calibration=None, weight_bases=4, act_bases=5, example_input=None, binarize=None,
            keep_float=None, binarize_depthwise=False, min_fan_in=64, method=DEFAULT_METHOD, seed=0, progress=None,
            input_shapes=None, act_coding="thermometer", integer=None):
    """Convert `model` into a PA multi-base binary network.

    model: ONNX file path, onnx.ModelProto, or torch.nn.Module (then example_input is required);
        or a module from pabnn.converters.torch.prepare, exported as it is (no other argument used).
    calibration: real inputs [batch, ...] (or {input name: array}) used to fit the activation
        staircases of the binarized layers (required unless `model` is prepared).
    weight_bases (M), act_bases (N): bit-planes per binarized layer's weights and input.
    binarize: names or glob patterns of the Conv/Gemm nodes to binarize (default: all but the
        first and last, grouped convs included, depthwise ones excluded).
    keep_float: names or glob patterns of layers to keep in float in any case.
    binarize_depthwise: the default choice also binarizes depthwise convs (one input channel per
        output channel; their binary kernel uses one bit of each 64-bit word, see
        engine/ops/pa_conv.py).
    min_fan_in: the default choice keeps float the layers with fewer than this many inputs per
        output value ((C/group) * kh * kw, or a Gemm's K; converters/passes.py: fan_in). Their
        binarized outputs lose the most (docs/accuracy.md) for the fewest operations saved.
    Layers that are already binary (a Sign or two-level quantizer before a Conv/Gemm whose
    weights are +-alpha per output channel; see converters/binary_import.py) are imported
    exactly as PA(1, N) layers first, wherever they are (first and last layers included): they
    are never refitted or calibrated. The default choice of `binarize` then applies to the
    remaining float Conv/Gemm layers; keep_float also keeps an already binary layer float.
    method: calibration method, one of methods.METHODS ("lloyd", "sequential", "regression",
        "rounding", "equalized", "selected" (the default), "propagated"; see pabnn.converters.methods). The
        last five also refit the float layers after the first binarized one (reported in
        metadata["converter"]["refitted_float"]).
        progress: show a progress bar (None: on a terminal).
    act_coding: how each binarized layer stores its input's activation levels: "thermometer" (the
        default: N threshold planes, any levels) or "binary" (levels on a uniform grid
        lowest + e * q, q stored in ceil(log2(N + 1)) binary planes: PA(4, 5) is 4 x 3 binary
        convolutions instead of 4 x 5; see engine/ops/pa_conv.py). Imported binary layers keep
        the thermometer code.
    integer: names or glob patterns of Conv/Gemm nodes to run as exact 8-bit integer layers
        (IntConv/IntLinear, engine/ops/int_conv.py) instead of float or PA: int8 weights with a
        per-output-channel scale, the input quantized per tensor to uint8 with the scale and zero
        point that the calibration data seen at the layer calls for (converters/integer.py). They
        take precedence over `binarize`; keep_float keeps a layer float in any case.
    input_shapes: {input name: shape} fixing input sizes the model leaves open (import_onnx). Sizes
        left open stay symbolic: calibration runs at the calibration data's sizes, and the result
        runs at any sizes the graph takes (a PA layer's parameters do not depend on them).
    """
    # A PreparedModel (pabnn.converters.torch), also inside DistributedDataParallel/DataParallel.
    prepared = model if getattr(model, "is_pabnn_prepared", False) else getattr(model, "module", None)
    if getattr(prepared, "is_pabnn_prepared", False):
        if integer:
            raise ConversionError("integer layers are chosen when converting a model, not a prepared one: "
                                  "pass integer=... with the model and calibration data")
        return prepared.export()
    require_calibration(calibration, integer)
    if calibration is None:
        raise ConversionError("convert needs calibration=<real inputs [batch, ...]>")
    for name, value in (("weight_bases", weight_bases), ("act_bases", act_bases)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 16:
            raise ConversionError(f"{name} must be an int in 1..16, found {value!r}")
    if not isinstance(min_fan_in, int) or isinstance(min_fan_in, bool) or min_fan_in < 1:
        raise ConversionError(f"min_fan_in must be an int >= 1, found {min_fan_in!r}")
    if method not in METHODS:
        raise ConversionError(f"unknown calibration method {method!r}; methods: {list(METHODS)}")
    if act_coding not in ACT_CODINGS:
        raise ConversionError(f"act_coding must be one of {list(ACT_CODINGS)}, found {act_coding!r}")
    onnx_model, source_hash = _load_source(model, example_input)
    imported_graph = import_onnx(onnx_model, input_shapes=input_shapes,
                                 example_shapes=_calibration_shapes(onnx_model, calibration))
    graph = import_binary_layers(fold_batchnorm(factor_dynamic_weights(imported_graph)), keep_float)
    imported = [node.name for node in graph.nodes if node.op in IMPORTED_OPS]
    feeds = _calibration_feeds(graph, calibration)
    integer_names = choose_integer_layers(graph, integer, keep_float)
    names = [name for name in choose_layers_to_binarize(graph, binarize, keep_float, binarize_depthwise, min_fan_in)
             if name not in integer_names]
    calibrated, fits, latent_weights, refits, integer_reports = calibrate(
        graph, names, feeds, weight_bases, act_bases, method, seed, progress, act_coding, integer_names)
    metadata = dict(graph.metadata, source_sha256=source_hash, converter={
        "weight_bases": weight_bases, "act_bases": act_bases, "act_coding": act_coding, "binarized": names,
        "integer": integer_reports,
        "imported_binary": imported,
        "method": method, "refitted_float": refits,
        "calibration_samples": int(next(iter(feeds.values())).shape[0]), "seed": seed,
    }, fits=[{key: value for key, value in fit.items() if key != "candidates"} for fit in fits])
    # Each layer's scored candidates (dozens per layer) stay in ConvertedModel.fits, out of the file.
    result = Graph(graph.inputs, graph.outputs, calibrated.nodes, metadata)
    result.infer_shapes()
    return ConvertedModel(result, fits, float_graph=graph, latent_weights=latent_weights)


def _load_source(model, example_input):
    """(onnx.ModelProto, sha256 of the serialized source model)."""
    if isinstance(model, (str, os.PathLike)):
        try:
            with open(model, "rb") as handle:
                data = handle.read()
        except OSError as error:
            raise ConversionError(f"{model}: cannot read: {error.strerror}") from None
        try:
            proto = onnx.load_from_string(data)
        except Exception as error:
            raise ConversionError(f"{model}: not a readable ONNX file: {error}") from None
        if not proto.graph.node:
            raise ConversionError(f"{model}: the ONNX graph has no nodes (not an ONNX model file?)")
        return proto, hashlib.sha256(data).hexdigest()
    if isinstance(model, onnx.ModelProto):
        return model, hashlib.sha256(model.SerializeToString()).hexdigest()
    if type(model).__module__.startswith("torch") or hasattr(model, "state_dict"):
        from .torch_export import export_to_onnx

        proto = export_to_onnx(model, example_input)
        return proto, hashlib.sha256(proto.SerializeToString()).hexdigest()
    raise ConversionError(f"model must be an ONNX path, an onnx.ModelProto or a torch.nn.Module, "
                          f"found {type(model).__name__}")


def _calibration_shapes(onnx_model, calibration):
    """{input name: shape of its calibration data}: the sizes symbolic input sizes are traced at."""
    initializers = {initializer.name for initializer in onnx_model.graph.initializer}
    names = [value.name for value in onnx_model.graph.input if value.name not in initializers]
    if not isinstance(calibration, dict):
        calibration = {names[0]: calibration} if len(names) == 1 else {}
    shapes = {}
    for value in onnx_model.graph.input:
        if value.name not in names or value.name not in calibration:
            continue
        shape = np.shape(calibration[value.name])
        dims = value.type.tensor_type.shape.dim
        if len(shape) == len(dims):  # else _calibration_feeds says what is wrong
            # Fixed dimensions are the model's; _calibration_feeds checks the data against them.
            shapes[value.name] = [None] + [None if dim.HasField("dim_value") and dim.dim_value >= 1 or size < 1
                                           else int(size) for dim, size in zip(dims[1:], shape[1:])]
    return shapes


def _calibration_feeds(graph, calibration):
    if not isinstance(calibration, dict):
        if len(graph.inputs) != 1:
            raise ConversionError(f"the model has inputs {[i.name for i in graph.inputs]}: pass calibration as "
                                  "{input name: array}")
        calibration = {graph.inputs[0].name: calibration}
    feeds = {}
    for info in graph.inputs:
        if info.name not in calibration:
            raise ConversionError(f"calibration data for input {info.name!r} is missing")
        array = np.asarray(calibration[info.name], dtype=np.float32)
        if array.ndim != len(info.shape) or array.shape[1:] != tuple(info.shape[1:]) or array.shape[0] < 1:
            raise ConversionError(f"calibration for input {info.name!r}: expected shape "
                                  f"{['batch'] + list(info.shape[1:])} with batch >= 1, found {list(array.shape)}")
        if not np.all(np.isfinite(array)):
            raise ConversionError(f"calibration for input {info.name!r} holds NaN or Inf")
        feeds[info.name] = array
    return feeds
