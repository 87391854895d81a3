"""The ONNX emulation of the PA ops (PAConv, PALinear) and of Staircase, in standard float ops.

A PA layer computes y = activation(conv(Qw(W), Qa(x)) + b + residual) (engine/ops/pa_conv.py).
Its export computes exactly that in float32 ONNX:

- Qa, per channel c of the input (N thresholds, shared steps, a lowest level):
      Qa(x)[c] = act_lowest + sum_j act_steps[j] * (x[c] >= act_thresholds[j, c])
  becomes Unsqueeze(x, 0) [1, B, C, ...] GreaterOrEqual thresholds [N, 1, C, 1, ...] -> Cast to
  float -> Mul steps [N, 1, ...] -> ReduceSum over the N planes -> Add act_lowest. The comparisons
  are those of the engine (float32 input against float32 thresholds; NaN compares false and
  gives the lowest level); only the sum of the N levels rounds differently (float32 in ONNX, one
  float64 sum rounded once in pabnn).
- Qw(W) is rebuilt from the sign bit-planes and per-channel coefficients (pa_conv.weight_values)
  and stored as one float32 Conv/Gemm weight initializer [O, C/group, kh, kw] (or [O, C]).
- Padding, by the layer's padding rule: "zero_before_quantizer" and "value_before_quantizer" pad
  the real-valued input with 0 (or pad_value, as float32) in an explicit Pad node before Qa, so a
  padded position holds Qa(0) (or Qa(pad_value)) as in pabnn, and the Conv has no pads;
  "zero_after_quantizer" quantizes first and lets the Conv zero-pad the quantized tensor.
- The epilogue: Add the residual input (when the node has one), then Relu (activation "relu").

A layer with act_coding "binary" (level index q = #{j : x >= s_j} in binary planes weighted
e * 2^b, so Qa(x) = act_lowest + e * q) is emulated as the thermometer code with N equal steps
e = act_steps[0]: the same values (`thermometer_steps`).

Each function takes the exporter's builder (converters/onnx_export.py: `OnnxBuilder`), the pabnn
node and {tensor name: shape}, and writes ONNX nodes whose outputs are the node's outputs.
"""
import numpy as np

from pabnn.engine.ops.pa_conv import act_coding, padding_rule, weight_values


def thermometer_steps(node):
    """float32 [N]: the steps of the thermometer code with the values of the node's activation code
    (its act_steps, or N times the step e of the binary code)."""
    p = node.params
    if act_coding(node) == "binary":
        return np.full(p["act_thresholds"].shape[0], p["act_steps"][0], dtype=np.float32)
    return p["act_steps"]


def act_staircase(builder, x, rank, thresholds, steps, lowest, prefix, output=None):
    """ONNX nodes computing lowest + sum_j steps[j] * (x[:, c] >= thresholds[j, c]) for `x` of
    rank `rank` (channels on axis 1); returns the output's name (`output` when given).

    thresholds float32 [N, C], steps float32 [N], lowest float32 [1]."""
    n_planes, channels = thresholds.shape
    extra = (1,) * (rank - 2)
    expanded = builder.add("Unsqueeze", [x, builder.constant(np.array([0], np.int64), f"{prefix}/axis0")],
                           f"{prefix}/expand")
    threshold_name = builder.constant(thresholds.astype(np.float32).reshape((n_planes, 1, channels) + extra),
                                      f"{prefix}/act_thresholds")
    bits = builder.add("GreaterOrEqual", [expanded, threshold_name], f"{prefix}/compare")
    planes = builder.add("Cast", [bits], f"{prefix}/planes", to=1)  # 1: FLOAT
    step_name = builder.constant(steps.astype(np.float32).reshape((n_planes,) + (1,) * rank), f"{prefix}/act_steps")
    levels = builder.add("Mul", [planes, step_name], f"{prefix}/steps")
    summed = builder.add("ReduceSum", [levels, builder.constant(np.array([0], np.int64), f"{prefix}/axis0_sum")],
                         f"{prefix}/sum", keepdims=0)
    return builder.add("Add", [summed, builder.constant(lowest.astype(np.float32).reshape(()), f"{prefix}/act_lowest")],
                       f"{prefix}/quantized", output=output)


def _epilogue(builder, node, y, output):
    """Residual Add and Relu of the fused epilogue (engine/ops/_epilogue.py) on `y`."""
    relu = node.attrs.get("activation") == "relu"
    if len(node.inputs) == 2:
        y = builder.add("Add", [y, node.inputs[1]], f"{node.name}/residual", output=None if relu else output)
    if relu:
        y = builder.add("Relu", [y], f"{node.name}/relu", output=output)
    return y


def _has_epilogue(node):
    return len(node.inputs) == 2 or node.attrs.get("activation") == "relu"


def export_pa_conv(builder, node, shapes):
    p = node.params
    rule, pad_value = padding_rule(node)
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    x = node.inputs[0]
    if rule != "zero_after_quantizer" and any(pads):
        top, left, bottom, right = pads
        x = builder.add("Pad", [x, builder.constant(np.array([0, 0, top, left, 0, 0, bottom, right], np.int64),
                                                    f"{node.name}/pads"),
                                builder.constant(np.array(pad_value, np.float32), f"{node.name}/pad_value")],
                        f"{node.name}/pad", mode="constant")
        conv_pads = [0, 0, 0, 0]
    else:
        conv_pads = pads
    quantized = act_staircase(builder, x, 4, p["act_thresholds"], thermometer_steps(node), p["act_lowest"],
                              f"{node.name}/Qa")
    weight = builder.constant(weight_values(node).astype(np.float32), f"{node.name}/Qw")
    bias = builder.constant(p["bias"], f"{node.name}/bias")
    output = node.outputs[0]
    y = builder.add("Conv", [quantized, weight, bias], f"{node.name}/conv",
                    output=None if _has_epilogue(node) else output,
                    strides=list(node.attrs.get("strides", [1, 1])), pads=conv_pads,
                    dilations=list(node.attrs.get("dilations", [1, 1])), group=int(node.attrs.get("group", 1)))
    _epilogue(builder, node, y, output)


def export_pa_linear(builder, node, shapes):
    p = node.params
    quantized = act_staircase(builder, node.inputs[0], 2, p["act_thresholds"], thermometer_steps(node), p["act_lowest"],
                              f"{node.name}/Qa")
    weight_4d = weight_values(node)
    weight = builder.constant(weight_4d.reshape(weight_4d.shape[:2]).astype(np.float32), f"{node.name}/Qw")
    bias = builder.constant(p["bias"], f"{node.name}/bias")
    output = node.outputs[0]
    y = builder.add("Gemm", [quantized, weight, bias], f"{node.name}/gemm",
                    output=None if _has_epilogue(node) else output, transB=1)
    _epilogue(builder, node, y, output)


def export_staircase(builder, node, shapes):
    rank = len(shapes[node.inputs[0]])
    act_staircase(builder, node.inputs[0], rank, node.params["thresholds"], node.params["steps"],
                  node.params["lowest"], node.name, output=node.outputs[0])
