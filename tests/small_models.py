"""A small ONNX model built in code that touches most converters, and its PA conversion.

x [N, 3, 8, 8] -> BatchNormalization (stays a ChannelAffine: it reads the graph input)
  -> Conv 3x3 -> Relu -> MaxPool 2x2 -> Conv 3x3 -> BatchNormalization (folds) -> Relu
  -> Add (residual) -> AveragePool 3x3 pad 1 -> Conv 1x1 stride 2 -> Relu -> GlobalAveragePool
  -> Flatten -> Gemm 16->12 -> Relu -> Reshape [0, 3, 4] -> Softmax -> Flatten -> Gemm 12->5 -> y
Converted with the default layer choice and min_fan_in=1 (its layers are narrow), the middle two Convs become PAConv and the first Gemm
PALinear.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pabnn.converters import convert

INPUT_SHAPE = (3, 8, 8)
IR_VERSION = 9


def small_onnx_model(seed=0):
    rng = np.random.default_rng(seed)

    def weight(name, *shape, scale=0.5):
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)

    def batchnorm_params(prefix, channels):
        return [
            numpy_helper.from_array((1 + 0.1 * rng.standard_normal(channels)).astype(np.float32), f"{prefix}_scale"),
            numpy_helper.from_array((0.1 * rng.standard_normal(channels)).astype(np.float32), f"{prefix}_bias"),
            numpy_helper.from_array((0.1 * rng.standard_normal(channels)).astype(np.float32), f"{prefix}_mean"),
            numpy_helper.from_array((1 + rng.random(channels)).astype(np.float32), f"{prefix}_var"),
        ]

    initializers = [
        *batchnorm_params("bn0", 3),
        weight("w1", 8, 3, 3, 3), weight("b1", 8),
        weight("w2", 8, 8, 3, 3, scale=0.2), weight("b2", 8),
        *batchnorm_params("bn2", 8),
        weight("w3", 16, 8, 1, 1), weight("b3", 16),
        weight("g1", 12, 16), weight("gb1", 12),
        weight("g2", 5, 12), weight("gb2", 5),
        numpy_helper.from_array(np.array([0, 3, 4], np.int64), "shape"),
    ]
    bn = ["scale", "bias", "mean", "var"]
    nodes = [
        helper.make_node("BatchNormalization", ["x"] + [f"bn0_{k}" for k in bn], ["b0"], name="bn0"),
        helper.make_node("Conv", ["b0", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2"] + [f"bn2_{k}" for k in bn], ["n2"], name="bn2"),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
        helper.make_node("Add", ["r2", "p1"], ["a"], name="add"),
        helper.make_node("AveragePool", ["a"], ["ap"], name="avgpool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["ap", "w3", "b3"], ["c3"], name="conv3", kernel_shape=[1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gp"], name="gap"),
        helper.make_node("Flatten", ["gp"], ["f1"], name="flatten1"),
        helper.make_node("Gemm", ["f1", "g1", "gb1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu4"),
        helper.make_node("Reshape", ["hr", "shape"], ["rs"], name="reshape"),
        helper.make_node("Softmax", ["rs"], ["sm"], name="softmax", axis=-1),
        helper.make_node("Flatten", ["sm"], ["f2"], name="flatten2"),
        helper.make_node("Gemm", ["f2", "g2", "gb2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def calibration_images(count=32, seed=1):
    return np.random.default_rng(seed).standard_normal((count, *INPUT_SHAPE)).astype(np.float32)


def small_pa_graph(weight_bases=2, act_bases=3):
    """The small model converted to PA: PAConv, PALinear, ChannelAffine and float ops."""
    return convert(small_onnx_model(), calibration=calibration_images(), weight_bases=weight_bases,
                   act_bases=act_bases, min_fan_in=1).graph
