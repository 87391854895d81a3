"""Models at ONNX opsets 7-10 (upgraded to 11 on import, converters/onnx_opset_upgrade.py).

The ONNX model zoo's classics are exported at opset 9 (and their older versions at 7 and 8):
AlexNet, ZFNet, VGG-19, GoogLeNet (Inception v1), BN-Inception (Inception v2), ResNet-50,
DenseNet-121, ShuffleNet and SqueezeNet. Each has a small look-alike here, built with onnx.helper
from the same op vocabulary and topology pattern, at small sizes with random weights. For each:
- the float import (engine kernels and the float64 reference) equals onnxruntime running the
  ORIGINAL old-opset model within FLOAT32_RTOL;
- the PA(2,2) conversion with a few calibration images (method "lloyd") runs, and every kernel of
  the converted graph equals its reference (tests/models.py).
The models at opsets 7 and 8 are written as those exporters wrote them: IR version 3, the
initializers also listed as graph inputs. Caffe2's exports have a fixed batch of 1 (input
[1, 3, H, W], Reshape [1, ...]); they are compared with onnxruntime at batch 1 and converted with a
larger calibration batch. Then the single-op rewrites of the upgrade and its errors.
"""
import numpy as np
import onnx
import pytest
from models import assert_engine_matches_reference_per_op
from onnx import TensorProto, helper, numpy_helper
from test_onnx_import import assert_graph_matches, onnxruntime_outputs

from pabnn.converters import convert, import_onnx
from pabnn.engine import ConversionError, Session

IR_VERSIONS = {7: 3, 8: 3, 9: 4, 10: 5}  # what exporters of each opset wrote


class Builder:
    """Appends nodes with random weights to an ONNX graph written at `opset`."""

    def __init__(self, opset, seed=0):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes, self.initializers = [], []
        self.count = 0

    def _name(self, op):
        self.count += 1
        return f"{op.lower()}{self.count}"

    def constant(self, array, dtype=np.float32):
        name = f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype), name))
        return name

    def node(self, op, inputs, **attrs):
        name = self._name(op)
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    def conv(self, x, cin, cout, kernel, stride=1, pad=None, group=1):
        fan_in = cin // group * kernel * kernel
        weight = self.constant(self.rng.normal(0, np.sqrt(2 / fan_in), (cout, cin // group, kernel, kernel)))
        bias = self.constant(self.rng.normal(0, 0.1, cout))
        attrs = {"kernel_shape": [kernel, kernel], "strides": [stride, stride], "pads": [kernel // 2 if pad is None
                                                                                         else pad] * 4}
        if group > 1:
            attrs["group"] = group
        return self.node("Conv", [x, weight, bias], **attrs)

    def relu(self, x):
        return self.node("Relu", [x])

    def conv_relu(self, x, cin, cout, kernel, stride=1, pad=None, group=1):
        return self.relu(self.conv(x, cin, cout, kernel, stride, pad, group))

    def batchnorm(self, x, channels, spatial=None):
        parameters = [self.constant(value) for value in (
            self.rng.uniform(0.5, 1.5, channels), self.rng.normal(0, 0.1, channels),
            self.rng.normal(0, 0.1, channels), self.rng.uniform(0.5, 1.5, channels))]
        attrs = {"epsilon": 1e-3}
        if spatial is not None:  # BatchNormalization-7/8 (Caffe2's exports write it)
            attrs["spatial"] = spatial
        return self.node("BatchNormalization", [x] + parameters, **attrs)

    def conv_bn(self, x, cin, cout, kernel, stride=1, group=1, relu=True, spatial=None):
        y = self.batchnorm(self.conv(x, cin, cout, kernel, stride, group=group), cout, spatial)
        return self.relu(y) if relu else y

    def max_pool(self, x, kernel, stride, pads=(0, 0, 0, 0), ceil_mode=0):
        attrs = {"kernel_shape": [kernel, kernel], "strides": [stride, stride], "pads": list(pads)}
        if ceil_mode:  # MaxPool-10
            attrs["ceil_mode"] = 1
        return self.node("MaxPool", [x], **attrs)

    def average_pool(self, x, kernel, stride, pad=0, count_include_pad=0):
        return self.node("AveragePool", [x], kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4,
                         count_include_pad=count_include_pad)

    def lrn(self, x, size=5):
        return self.node("LRN", [x], size=size, alpha=0.05, beta=0.75, bias=1.0)

    def reshape(self, x, shape):
        return self.node("Reshape", [x, self.constant(shape, np.int64)])

    def dropout(self, x, ratio=0.5):
        return self.node("Dropout", [x], ratio=ratio)

    def gemm(self, x, cin, cout):
        weight = self.constant(self.rng.normal(0, np.sqrt(2 / cin), (cout, cin)))
        return self.node("Gemm", [x, weight, self.constant(self.rng.normal(0, 0.1, cout))], transB=1)

    def classifier(self, x, features, hidden, classes):
        """AlexNet/VGG's big fully connected head: Gemm -> Relu -> Dropout, twice, Gemm, Softmax."""
        for cin, cout in ((features, hidden), (hidden, hidden)):
            x = self.dropout(self.relu(self.gemm(x, cin, cout)))
        return self.node("Softmax", [self.gemm(x, hidden, classes)])

    def model(self, input_shape, output, batch="N"):
        """The ONNX model with input "x" [batch, *input_shape] (batch 1 for a Caffe2-style export)."""
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *input_shape])]
        ir_version = IR_VERSIONS[self.opset]
        if ir_version < 4:  # IR 3: every initializer is also a graph input
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.initializers]
        graph = helper.make_graph(self.nodes, "classic", inputs,
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = ir_version
        # Old IR versions require the output's shape: ONNX's shape inference gives it.
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        (typed,) = [value for value in list(inferred.graph.output) + list(inferred.graph.value_info)
                    if value.name == output and value.type.tensor_type.HasField("shape")]
        model.graph.output[0].CopyFrom(typed)
        onnx.checker.check_model(model)
        return model


# ---- the nine classics, small -----------------------------------------------------------------

def alexnet(opset):
    """Caffe2's bvlc_alexnet: 11x11 stride-4 conv, LRN after the first two conv stages, grouped
    convs, Reshape [1, 9216]-style flattening, the big FC head with Dropout."""
    b = Builder(opset, seed=1)
    x = b.max_pool(b.lrn(b.conv_relu("x", 3, 16, 11, 4, pad=0)), 3, 2)
    x = b.max_pool(b.lrn(b.conv_relu(x, 16, 24, 5, group=2)), 3, 2)
    x = b.conv_relu(b.conv_relu(b.conv_relu(x, 24, 32, 3), 32, 32, 3, group=2), 32, 16, 3, group=2)
    x = b.reshape(b.max_pool(x, 2, 1), [1, 64])
    return b.model((3, 67, 67), b.classifier(x, 64, 48, 10), batch=1), (3, 67, 67)


def zfnet(opset):
    """ZFNet-512: 7x7 stride-2 conv, LRN (size 3 here), padded max pools, Flatten, the big FC head."""
    b = Builder(opset, seed=2)
    x = b.max_pool(b.lrn(b.conv_relu("x", 3, 12, 7, 2, pad=1), size=3), 3, 2, pads=(1, 1, 1, 1))
    x = b.max_pool(b.lrn(b.conv_relu(x, 12, 24, 5, 2, pad=0), size=3), 3, 2, pads=(1, 1, 1, 1))
    x = b.conv_relu(b.conv_relu(b.conv_relu(x, 24, 32, 3), 32, 32, 3), 32, 16, 3)
    x = b.node("Flatten", [x], axis=1)
    return b.model((3, 48, 48), b.classifier(x, 64, 40, 10)), (3, 48, 48)


def vgg19(opset):
    """VGG-19: five stages of 3x3 conv + Relu (2, 2, 4, 4, 4 convs), max pool between them, the big FC head."""
    b = Builder(opset, seed=3)
    x, channels = "x", 3
    for width, depth in ((4, 2), (8, 2), (8, 4), (12, 4), (12, 4)):
        for _ in range(depth):
            x, channels = b.conv_relu(x, channels, width, 3), width
        x = b.max_pool(x, 2, 2)
    x = b.node("Flatten", [x], axis=1)
    return b.model((3, 32, 32), b.classifier(x, 12, 24, 10)), (3, 32, 32)


def _inception(b, x, cin, widths, batchnorm=False, spatial=None):
    """GoogLeNet's module: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 (BN-Inception: two 3x3) | pool -> 1x1, concatenated."""
    one, (reduce3, out3), (reduce5, out5), pool_out = widths
    unit = (lambda y, ci, co, k: b.conv_bn(y, ci, co, k, spatial=spatial)) if batchnorm else b.conv_relu
    branches = [unit(x, cin, one, 1), unit(unit(x, cin, reduce3, 1), reduce3, out3, 3)]
    if batchnorm:
        branches.append(unit(unit(unit(x, cin, reduce5, 1), reduce5, out5, 3), out5, out5, 3))
        pool = b.average_pool(x, 3, 1, pad=1, count_include_pad=1)
    else:
        branches.append(unit(unit(x, cin, reduce5, 1), reduce5, out5, 5))
        pool = b.max_pool(x, 3, 1, pads=(1, 1, 1, 1))
    branches.append(unit(pool, cin, pool_out, 1))
    return b.node("Concat", branches, axis=1), one + out3 + out5 + pool_out


def googlenet(opset):
    """bvlc_googlenet / Inception v1: stem with LRN, Inception modules (Concat), a max pool between
    them, global AveragePool, Dropout, Reshape [1, 1024]-style, Gemm, Softmax."""
    b = Builder(opset, seed=4)
    x = b.lrn(b.max_pool(b.conv_relu("x", 3, 8, 7, 2, pad=3), 3, 2, pads=(0, 0, 1, 1)))
    x = b.max_pool(b.lrn(b.conv_relu(b.conv_relu(x, 8, 8, 1), 8, 16, 3)), 3, 2, pads=(0, 0, 1, 1))
    x, channels = _inception(b, x, 16, (8, (6, 8), (2, 4), 4))
    x, channels = _inception(b, x, channels, (8, (8, 12), (4, 6), 6))
    x = b.max_pool(x, 3, 2, pads=(0, 0, 1, 1))
    x, channels = _inception(b, x, channels, (12, (8, 12), (4, 6), 6))
    x = b.reshape(b.dropout(b.average_pool(x, 2, 1), 0.4), [1, channels])
    return b.model((3, 32, 32), b.node("Softmax", [b.gemm(x, channels, 10)]), batch=1), (3, 32, 32)


def bn_inception(opset):
    """Inception v2 / BN-Inception: every conv followed by BatchNormalization (spatial=1 written out
    at opsets 7-8), the double-3x3 branch, an average-pool branch, Concat."""
    b = Builder(opset, seed=5)
    spatial = 1 if opset < 9 else None
    x = b.max_pool(b.conv_bn("x", 3, 8, 7, 2, spatial=spatial), 3, 2, pads=(0, 0, 1, 1))
    x = b.max_pool(b.conv_bn(b.conv_bn(x, 8, 8, 1, spatial=spatial), 8, 16, 3, spatial=spatial), 3, 2,
                   pads=(0, 0, 1, 1))
    x, channels = _inception(b, x, 16, (8, (6, 8), (4, 6), 4), batchnorm=True, spatial=spatial)
    x, channels = _inception(b, x, channels, (8, (8, 8), (4, 6), 6), batchnorm=True, spatial=spatial)
    x = b.reshape(b.average_pool(x, 4, 1), [1, channels])
    return b.model((3, 32, 32), b.node("Softmax", [b.gemm(x, channels, 10)]), batch=1), (3, 32, 32)


def resnet50(opset):
    """ResNet-50 (Caffe2): stem conv + BN + max pool, bottleneck blocks (1x1 -> 3x3 -> 1x1, BN after
    each, a 1x1 stride-2 shortcut with BN where the shape changes), residual Sum then Relu."""
    b = Builder(opset, seed=6)
    x = b.max_pool(b.conv_bn("x", 3, 8, 7, 2), 3, 2, pads=(1, 1, 1, 1))
    channels = 8
    for width, stride in ((4, 1), (4, 1), (8, 2), (8, 1)):
        body = b.conv_bn(b.conv_bn(b.conv_bn(x, channels, width, 1), width, width, 3, stride),
                         width, 4 * width, 1, relu=False)
        shortcut = x if stride == 1 and channels == 4 * width else \
            b.conv_bn(x, channels, 4 * width, 1, stride, relu=False)
        x, channels = b.relu(b.node("Sum", [body, shortcut])), 4 * width
    x = b.reshape(b.average_pool(x, 4, 1), [1, channels])
    return b.model((3, 32, 32), b.node("Softmax", [b.gemm(x, channels, 10)]), batch=1), (3, 32, 32)


def densenet121(opset):
    """DenseNet-121: dense blocks (BN -> Relu -> 1x1 conv -> BN -> Relu -> 3x3 conv, concatenated onto
    the block's input), a transition (BN -> Relu -> 1x1 conv -> 2x2 average pool), final BN + Relu,
    GlobalAveragePool, the classifier as a 1x1 conv, Flatten, Softmax."""
    b = Builder(opset, seed=7)
    x = b.max_pool(b.conv_bn("x", 3, 8, 7, 2), 3, 2, pads=(1, 1, 1, 1))
    channels, growth = 8, 4

    def dense_block(x, channels, layers):
        for _ in range(layers):
            y = b.conv(b.relu(b.batchnorm(x, channels)), channels, 2 * growth, 1)
            y = b.conv(b.relu(b.batchnorm(y, 2 * growth)), 2 * growth, growth, 3)
            x, channels = b.node("Concat", [x, y], axis=1), channels + growth
        return x, channels

    x, channels = dense_block(x, channels, 3)
    x = b.average_pool(b.conv(b.relu(b.batchnorm(x, channels)), channels, channels // 2, 1), 2, 2)
    x, channels = dense_block(x, channels // 2, 3)
    x = b.node("GlobalAveragePool", [b.relu(b.batchnorm(x, channels))])
    x = b.node("Flatten", [b.conv(x, channels, 10, 1)], axis=1)
    return b.model((3, 32, 32), b.node("Softmax", [x])), (3, 32, 32)


def shufflenet(opset):
    """ShuffleNet (Caffe2, groups 3): grouped 1x1 conv -> BN -> Relu -> channel shuffle (Reshape to
    [1, groups, C/groups, H, W], Transpose, Reshape back) -> depthwise 3x3 -> BN -> grouped 1x1 ->
    BN; stride-2 units Concat a 3x3 average pool of their input, stride-1 units Sum it."""
    b = Builder(opset, seed=8)
    groups = 3
    x = b.max_pool(b.conv_bn("x", 3, 12, 3, 2), 3, 2, pads=(1, 1, 1, 1))
    channels, size = 12, 8
    for out_channels, stride in ((24, 2), (24, 1), (48, 2)):
        branch = out_channels - channels if stride == 2 else out_channels
        middle = 2 * groups
        y = b.conv_bn(x, channels, middle, 1, group=groups)
        y = b.reshape(b.node("Transpose", [b.reshape(y, [1, groups, middle // groups, size, size])],
                             perm=[0, 2, 1, 3, 4]), [1, middle, size, size])
        y = b.conv_bn(y, middle, middle, 3, stride, group=middle, relu=False)
        y = b.conv_bn(y, middle, branch, 1, group=groups, relu=False)
        if stride == 2:
            x = b.relu(b.node("Concat", [b.average_pool(x, 3, 2, pad=1), y], axis=1))
        else:
            x = b.relu(b.node("Sum", [x, y]))
        channels, size = out_channels, size // stride
    x = b.reshape(b.node("GlobalAveragePool", [x]), [1, channels])
    return b.model((3, 32, 32), b.node("Softmax", [b.gemm(x, channels, 10)]), batch=1), (3, 32, 32)


def squeezenet(opset):
    """SqueezeNet 1.0: fire modules (1x1 squeeze -> Relu -> 1x1 and 3x3 expands -> Relu -> Concat),
    max pools (ceil_mode at opset 10), Dropout, the classifier as a 1x1 conv -> Relu ->
    GlobalAveragePool, and Softmax over the [N, classes, 1, 1] output (axis 1, opset < 13)."""
    b = Builder(opset, seed=9)
    ceil_mode = int(opset >= 10)

    def fire(x, cin, squeeze, expand):
        s = b.conv_relu(x, cin, squeeze, 1)
        return b.node("Concat", [b.conv_relu(s, squeeze, expand, 1), b.conv_relu(s, squeeze, expand, 3)], axis=1)

    x = b.max_pool(b.conv_relu("x", 3, 12, 3, 2, pad=0), 3, 2, ceil_mode=ceil_mode)
    x = b.max_pool(fire(fire(x, 12, 4, 8), 16, 4, 8), 3, 2, ceil_mode=ceil_mode)
    x = b.dropout(fire(x, 16, 6, 12), 0.5)
    x = b.node("GlobalAveragePool", [b.conv_relu(x, 24, 10, 1, pad=0)])
    return b.model((3, 33, 33), b.node("Softmax", [x])), (3, 33, 33)


# (builder, opset): the nine classics at opset 9, and opsets 7, 8 and 10 on one model or more each.
CLASSICS = [(alexnet, 9), (zfnet, 9), (vgg19, 9), (googlenet, 9), (bn_inception, 9), (resnet50, 9),
            (densenet121, 9), (shufflenet, 9), (squeezenet, 9),
            (zfnet, 7), (resnet50, 7), (bn_inception, 8), (squeezenet, 10)]


@pytest.mark.parametrize("build, opset", CLASSICS, ids=[f"{build.__name__}-opset{opset}" for build, opset in CLASSICS])
def test_classic_look_alike(build, opset):
    model, input_shape = build(opset)
    batch_1 = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    rng = np.random.default_rng(opset)
    x = rng.standard_normal((1 if batch_1 else 2, *input_shape)).astype(np.float32)
    graph = import_onnx(model)
    assert graph.metadata["onnx_opset"] == opset
    assert_graph_matches(graph, onnxruntime_outputs(model, x), x)

    calibration = rng.standard_normal((4, *input_shape)).astype(np.float32)
    # The baseline fit: the calibration methods are tested in test_calibration.py, and the default
    # one ("equalized") takes 4x as long on these models.
    converted = convert(model, calibration=calibration, weight_bases=2, act_bases=2, method="lloyd",
                        min_fan_in=1)
    ops = [node.op for node in converted.graph.nodes]
    assert "PAConv" in ops
    (output,) = Session(converted.graph).run(None, {"x": calibration[:3]})
    assert output.shape[0] == 3 and np.all(np.isfinite(output))
    assert_engine_matches_reference_per_op(converted.graph, {"x": calibration[:3]})


# ---- single-op rewrites of the upgrade ------------------------------------------------------------

def _single_node_model(opset, node, input_shape, initializers=()):
    """`node` (reading "x", writing "y") in a model; after a Relu when it would pass "x" through."""
    b = Builder(opset)
    if node.op_type == "Dropout":
        b.nodes.append(helper.make_node("Relu", ["x"], ["relu"], name="relu"))
        node.input[0] = "relu"
    b.nodes.append(node)
    b.initializers.extend(initializers)
    return b.model(input_shape, node.output[0])


def _assert_matches_onnxruntime(model, input_shape, batch=2):
    x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
    graph = import_onnx(model)
    assert_graph_matches(graph, onnxruntime_outputs(model, x), x)
    return graph


def _floats(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


@pytest.mark.parametrize("opset, scales", [(7, [1, 1, 2, 3]), (7, [1, 1, 3, 1.7]), (9, [1, 1, 1.5, 2.5]),
                                           (9, [1, 1, 3, 1])])
def test_upsample_becomes_resize_with_the_old_rounding(opset, scales):
    """The version converter's Resize-11 would round half-pixel (other pixels for scale 3 or 1.7)."""
    if opset < 9:
        node = helper.make_node("Upsample", ["x"], ["y"], name="upsample", mode="nearest",
                                scales=[float(s) for s in scales])
        initializers = []
    else:
        node = helper.make_node("Upsample", ["x", "scales"], ["y"], name="upsample", mode="nearest")
        initializers = [_floats("scales", scales)]
    graph = _assert_matches_onnxruntime(_single_node_model(opset, node, (3, 5, 4), initializers), (3, 5, 4))
    assert [node.op for node in graph.nodes] == ["Resize"]


@pytest.mark.parametrize("scales", [[1, 1, 2, 3], [1, 1, 0.5, 0.6], [1, 1, 0.7, 1]])
def test_resize_10_keeps_its_rounding(scales):
    """Resize-10 maps output i to i / scale and (onnxruntime) rounds down when upsampling, up when downsampling."""
    node = helper.make_node("Resize", ["x", "scales"], ["y"], name="resize", mode="nearest")
    model = _single_node_model(10, node, (3, 7, 6), [_floats("scales", scales)])
    _assert_matches_onnxruntime(model, (3, 7, 6))


@pytest.mark.parametrize("opset, node", [
    (7, helper.make_node("Pad", ["x"], ["y"], name="pad", pads=[0, 0, 1, 2, 0, 0, 2, 1], value=0.5)),
    (8, helper.make_node("Pad", ["x"], ["y"], name="pad", pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="reflect")),
    (9, helper.make_node("Slice", ["x"], ["y"], name="slice", starts=[1, 0], ends=[3, 1000], axes=[1, 3])),
    (9, helper.make_node("Clip", ["x"], ["y"], name="clip", min=-0.5, max=0.7)),
    (8, helper.make_node("AveragePool", ["x"], ["y"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=1)),
    (10, helper.make_node("AveragePool", ["x"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2],
                          ceil_mode=1)),
    (10, helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    (10, helper.make_node("Dropout", ["x"], ["y"], name="dropout", ratio=0.3)),
    (7, helper.make_node("Softmax", ["x"], ["y"], name="softmax", axis=2)),
], ids=["pad-attributes", "pad-reflect", "slice-attributes", "clip-attributes", "averagepool-count-include-pad",
        "averagepool-ceil-mode", "maxpool-ceil-mode", "dropout-ratio", "softmax-axis-2-flattens"])
def test_attribute_forms_of_old_ops(opset, node):
    """Attributes that became inputs, and the ops whose attributes stayed, against onnxruntime."""
    _assert_matches_onnxruntime(_single_node_model(opset, node, (4, 5, 5)), (4, 5, 5))


# ---- errors ---------------------------------------------------------------------------------------

def _error(model):
    with pytest.raises(ConversionError) as error:
        import_onnx(model)
    return str(error.value)


def test_unsupported_op_in_an_old_model_names_op_node_and_what_is_supported():
    node = helper.make_node("Hardmax", ["x"], ["y"], name="the_hardmax")
    message = _error(_single_node_model(9, node, (4, 5)))
    assert "'the_hardmax'" in message and "Hardmax (opset 9)" in message and "supported ops:" in message
    assert "LRN" in message and "Upsample" in message


def test_batchnorm_spatial_0_is_refused():
    b = Builder(7)
    y = b.batchnorm("x", 3, spatial=0)
    message = _error(b.model((3, 4, 4), y))
    assert f"'{y}'" in message and "spatial=0" in message


def test_resize_10_that_upsamples_and_downsamples_is_refused():
    node = helper.make_node("Resize", ["x", "scales"], ["y"], name="mixed", mode="nearest")
    message = _error(_single_node_model(10, node, (3, 6, 6), [_floats("scales", [1, 1, 2, 0.5])]))
    assert "'mixed'" in message and "upsample one axis and downsample another" in message


def test_reshape_that_fixes_a_batch_other_than_1_is_refused():
    b = Builder(9)
    y = b.reshape("x", [2, 24])
    message = _error(b.model((3, 4, 2), y))
    assert f"'{y}'" in message and "fixes the batch size at 2" in message


def test_the_callers_model_is_left_as_it_was():
    model, _ = squeezenet(9)
    before = model.SerializeToString()
    import_onnx(model)
    assert model.SerializeToString() == before
