"""Fuzzing ONNX input: a damaged or hostile ONNX model converts or raises ConversionError, never
another exception.

The seed is the small model of tests/small_models.py (BatchNormalization, Conv, Relu, MaxPool,
Add, AveragePool, GlobalAveragePool, Flatten, Gemm, Reshape, Softmax). Mutations:

- serialized bytes: truncation, bit flips, overwritten runs (through `convert(path)`);
- the ModelProto: initializers removed, retyped (float64, float16, int64, int8, bool, string),
  with data that does not match their dims, with external data; nodes removed, moved (use before
  definition, cycles), renamed inputs (dangling names), duplicated outputs, op types swapped,
  inputs dropped or added, attributes removed or given other values and types (zero, negative,
  huge, floats for ints, strings); graph input dims and types; the opset.

A model that imports must build a Session and run a sample (or refuse it with InputError).
Case counts are printed at the end of the run (tests/fuzzing.py).
"""
import copy

import numpy as np
import onnx
import pytest
from fuzzing import fuzz_settings, record
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from small_models import INPUT_SHAPE, calibration_images, small_onnx_model

from pabnn.converters import convert, import_onnx
from pabnn.engine import ConversionError, InputError, Session


@pytest.fixture(scope="module")
def seed_model():
    return small_onnx_model()


@pytest.fixture(scope="module")
def sample():
    return calibration_images(count=2, seed=5)


def check_graph_runs(graph, sample):
    """An imported graph builds a Session and runs the sample, or refuses it with InputError."""
    session = Session(graph)
    try:
        outputs = session.run(None, {name: sample for name in session.input_names})
    except InputError:
        return "imported, input refused (InputError)"
    shapes = graph.infer_shapes()
    for name, output in zip(session.output_names, outputs):
        assert output.dtype == np.float32 and output.shape == (len(sample),) + tuple(shapes[name][1:])
    return "imported and ran"


def import_and_run(model, sample, test):
    try:
        graph = import_onnx(model)
    except ConversionError as error:
        assert str(error)
        outcome = "ConversionError"
    else:
        outcome = check_graph_runs(graph, sample)
    record(test, outcome)
    return outcome


# ---- serialized bytes -------------------------------------------------------------------------

@fuzz_settings(ci_examples=40)
@given(data=st.data())
def test_damaged_onnx_bytes_convert_or_raise_conversion_error(seed_model, sample, tmp_path_factory, data):
    original = seed_model.SerializeToString()
    kind = data.draw(st.sampled_from(["truncate", "flip", "overwrite"]), label="kind")
    position = data.draw(st.integers(0, len(original) - 1), label="position")
    damaged = bytearray(original)
    if kind == "truncate":
        damaged = damaged[:position]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            damaged[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
            position = data.draw(st.integers(0, len(original) - 1), label="next position")
    else:
        run = data.draw(st.binary(min_size=1, max_size=32), label="bytes")
        damaged[position:position + len(run)] = run
    path = tmp_path_factory.mktemp("onnx") / "damaged.onnx"
    path.write_bytes(bytes(damaged))
    try:
        # No binarized layers: the import path is what is fuzzed here (fitting has its own test).
        model = convert(path, calibration=sample, binarize=[])
    except ConversionError as error:
        assert str(path) in str(error) or "ONNX" in str(error) or "calibration" in str(error), str(error)
        outcome = "ConversionError"
    else:
        outcome = check_graph_runs(model.graph, sample)
    record("damaged ONNX bytes", outcome)


# ---- the ModelProto ---------------------------------------------------------------------------

ATTRIBUTE_VALUES = st.one_of(
    st.integers(-3, 5), st.sampled_from([2**31, 2**62, -2**62, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.lists(st.integers(-2, 4), min_size=0, max_size=5),
    st.lists(st.sampled_from([0, 1, 2**40, -2**40]), min_size=1, max_size=4),
    st.lists(st.floats(-2, 2), min_size=1, max_size=3),
)
RETYPES = [np.float64, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_, str]


def retype_initializer(initializer, dtype):
    try:
        array = numpy_helper.to_array(initializer)
    except Exception:  # an earlier edit already damaged its data
        return
    if array.dtype.kind not in "biuf":
        array = np.zeros(array.shape)
    if dtype is str:
        converted = np.array([str(v) for v in array.reshape(-1)], dtype=object).reshape(array.shape)
    else:
        converted = array.astype(dtype)
    initializer.CopyFrom(numpy_helper.from_array(converted, initializer.name))


def mutate_model(model, draw):
    """Apply one or two random edits to `model` (a copy) in place."""
    graph = model.graph
    for _ in range(draw(st.integers(1, 2), label="edits")):
        kind = draw(st.sampled_from([
            "drop initializer", "retype initializer", "initializer data", "external data",
            "drop node", "move node", "dangling input", "cycle", "duplicate output", "op type",
            "drop input", "extra input", "attribute", "attribute", "attribute", "drop attribute",
            "input dims", "input type", "opset", "node name", "graph output",
        ]), label="edit")
        nodes = graph.node
        index = draw(st.integers(0, len(nodes) - 1), label="node") if len(nodes) else None
        initializers = graph.initializer
        init_index = draw(st.integers(0, len(initializers) - 1), label="initializer") if len(initializers) else None
        if kind == "drop initializer" and init_index is not None:
            del initializers[init_index]
        elif kind == "retype initializer" and init_index is not None:
            retype_initializer(initializers[init_index], draw(st.sampled_from(RETYPES), label="dtype"))
        elif kind == "initializer data" and init_index is not None:
            tensor = initializers[init_index]
            change = draw(st.sampled_from(["short raw data", "huge dims", "negative dim", "no data"]), label="how")
            if change == "short raw data":
                raw = numpy_helper.to_array(tensor).tobytes()
                tensor.ClearField("float_data")
                tensor.ClearField("int64_data")
                tensor.raw_data = raw[:max(0, len(raw) - draw(st.integers(1, 8), label="cut"))]
            elif change == "huge dims":
                tensor.dims[:] = [2**40, 2**30]
            elif change == "negative dim":
                tensor.dims[:] = [-1] + list(tensor.dims[1:])
            else:
                tensor.ClearField("raw_data")
                tensor.ClearField("float_data")
                tensor.ClearField("int64_data")
        elif kind == "external data" and init_index is not None:
            tensor = initializers[init_index]
            tensor.data_location = TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", draw(st.sampled_from(["/etc/hostname", "../weights.bin", "w.bin"]))
        elif kind == "drop node" and index is not None:
            del nodes[index]
        elif kind == "move node" and index is not None:
            node = copy.deepcopy(nodes[index])
            del nodes[index]
            nodes.insert(draw(st.integers(0, len(nodes)), label="to"), node)
        elif kind == "dangling input" and index is not None and nodes[index].input:
            nodes[index].input[draw(st.integers(0, len(nodes[index].input) - 1), label="slot")] = "nowhere"
        elif kind == "cycle" and index is not None and nodes[index].input:
            later = draw(st.integers(index, len(nodes) - 1), label="later")
            nodes[index].input[0] = nodes[later].output[0]
        elif kind == "duplicate output" and index is not None:
            other = draw(st.integers(0, len(nodes) - 1), label="other")
            nodes[index].output[0] = nodes[other].output[0]
        elif kind == "op type" and index is not None:
            nodes[index].op_type = draw(st.sampled_from(
                ["Conv", "Gemm", "Relu", "Add", "MaxPool", "AveragePool", "Reshape", "Softmax", "Flatten",
                 "BatchNormalization", "GlobalAveragePool", "MatMul", "Identity", "Constant", "Dropout", "Foo"]),
                label="op type")
        elif kind == "drop input" and index is not None and nodes[index].input:
            del nodes[index].input[draw(st.integers(0, len(nodes[index].input) - 1), label="slot")]
        elif kind == "extra input" and index is not None:
            nodes[index].input.append(draw(st.sampled_from(["x", "w1", "", "nowhere"]), label="name"))
        elif kind == "attribute" and index is not None:
            name = draw(st.sampled_from(["strides", "pads", "dilations", "kernel_shape", "group", "axis", "transA",
                                         "transB", "alpha", "beta", "epsilon", "ceil_mode", "count_include_pad",
                                         "auto_pad", "allowzero", "training_mode", "value"]), label="attribute")
            value = draw(ATTRIBUTE_VALUES, label="value")
            node = nodes[index]
            kept = [a for a in node.attribute if a.name != name]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute(name, value) if value != [] else
                                          helper.make_attribute(name, [], attr_type=onnx.AttributeProto.INTS)])
        elif kind == "drop attribute" and index is not None and nodes[index].attribute:
            del nodes[index].attribute[draw(st.integers(0, len(nodes[index].attribute) - 1), label="attribute")]
        elif kind == "input dims":
            dims = graph.input[0].type.tensor_type.shape.dim
            slot = draw(st.integers(0, len(dims) - 1), label="dim")
            value = draw(st.sampled_from([0, -1, 1, 2**40, 7, None]), label="size")
            if value is None:
                dims[slot].dim_param = "free"
            else:
                dims[slot].dim_value = value
        elif kind == "input type":
            graph.input[0].type.tensor_type.elem_type = draw(
                st.sampled_from([TensorProto.DOUBLE, TensorProto.INT64, TensorProto.FLOAT16, TensorProto.UNDEFINED]),
                label="type")
        elif kind == "opset":
            model.opset_import[0].version = draw(st.sampled_from([1, 6, 7, 9, 10, 11, 17, 21, 22, 1000]), label="opset")
        elif kind == "node name" and index is not None:
            nodes[index].name = draw(st.sampled_from(["", "conv1", "fc2", "x"]), label="name")
        elif kind == "graph output":
            graph.output.append(copy.deepcopy(graph.output[draw(st.integers(0, len(graph.output) - 1))]))
            graph.output[-1].name = draw(st.sampled_from(["y", "c1", "nowhere", "x", "w1"]), label="output")


@fuzz_settings(ci_examples=150)
@given(data=st.data())
def test_mutated_model_imports_or_raises_conversion_error(seed_model, sample, data):
    model = copy.deepcopy(seed_model)
    mutate_model(model, data.draw)
    import_and_run(model, sample, "mutated ModelProto")


@fuzz_settings(ci_examples=15)
@given(data=st.data())
def test_mutated_model_converts_to_pa_or_raises_conversion_error(seed_model, data):
    """The whole conversion, PA fitting included, on a mutated model."""
    model = copy.deepcopy(seed_model)
    mutate_model(model, data.draw)
    calibration = calibration_images(count=8)
    try:
        converted = convert(model, calibration=calibration, weight_bases=2, act_bases=2)
    except ConversionError as error:
        assert str(error)
        outcome = "ConversionError"
    else:
        outcome = check_graph_runs(converted.graph, calibration[:2])
    record("mutated ModelProto, PA conversion", outcome)


def test_seed_model_imports_and_converts(seed_model, sample):
    """The unmutated seed is a valid model: the fuzz tests start from something that works."""
    assert import_and_run(seed_model, sample, "seed") == "imported and ran"
    assert any(node.op == "PAConv" for node in convert(seed_model, calibration=calibration_images(),
                                                         weight_bases=2, act_bases=2).graph.nodes)


def test_input_shape_is_what_the_seed_declares(seed_model):
    dims = [d.dim_value for d in seed_model.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert tuple(dims) == INPUT_SHAPE
