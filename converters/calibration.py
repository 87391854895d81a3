"""Calibration: fit each binarized layer's staircases on calibration data and correct its output.

A binarized layer L computes y_L = conv(Qw(W), Qa(x_L)) + b. Its float original computes
f_L = conv(W, x_L^float) + b on the float network's input x_L^float. Calibration walks the graph
once, in order, and hands each binarized layer, with its calibration inputs and f_L, to a
calibration method (converters/methods.py, one class per method: "lloyd", "sequential",
"regression", "rounding", "equalized", "selected" (the default) and "propagated"), which chooses
Qw and Qa and corrects y_L so that it stays close to f_L. The sequential methods calibrate each
layer on the activations x_L that the network computes once all earlier layers are binarized
(run node by node, one pass over the calibration images); "lloyd" on the float network's.

The methods with `refit_float` also refit the float Conv/Gemm layers that follow a binarized
layer (by default only the classifier), in the same graph order: their weights and bias become
the least-squares fit of the float layer's output on the inputs that the binarized network gives
them (`refit_float_layer`). The first float layer reads the network's input, which binarization
does not change, and is never refitted.

Every fit, error and refit works on a layer's output statistics (`least_squares.py`, the shared
core); a layer's staircases and output corrections are in `layer_fit.py` and `selection.py`.
Levels stay shared by the tensor's channels and the lowest level stays 0 after a ReLU, so
every result is a valid PA layer (DESIGN.md section 2).
"""
import numpy as np
from tqdm.auto import tqdm

from pabnn.engine.errors import ConversionError
from pabnn.engine.graph import Graph
from pabnn.engine.ops import get_op
from pabnn.engine.session import Session

from .integer import integer_node
from .layer_fit import run_layer, run_node, sqnr_db, with_weight
from .least_squares import CALIBRATION_BATCH, output_statistics, refit_error, solve_refit, sum_statistics
from .methods import DEFAULT_METHOD, METHODS, LayerToFit
from .passes import is_nonnegative

# Ridges tried by the refit of float layers after binarized ones (relative to the mean diagonal
# of the normal matrix, towards the trained weights); the one with the smallest output error on
# held-out calibration images in REFIT_FOLDS-fold cross-validation is used.
REFIT_RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
REFIT_FOLDS = 4
# Calibration images on which "propagated" compares a layer's finalists downstream.
PROPAGATION_IMAGES = 256


def calibrate(graph, names, feeds, weight_bases, act_bases, method=DEFAULT_METHOD, seed=0, progress=None,
              act_coding="thermometer", integer=()):
    """Binarize the Conv/Gemm nodes `names` of `graph` with the calibration `method`, and turn the
    Conv/Gemm nodes `integer` into 8-bit integer layers (converters/integer.py) on the inputs they
    see in the same pass (the partly converted network's, for the sequential methods).

    act_coding: the activation code of every binarized layer ("thermometer" or "binary": Qa on a
    uniform grid, fitted by `layer_fit.approximate_layer`, so every method works with either).
    graph: float Graph (BatchNorm folded); feeds: {input name: float32 array [batch, ...]}.
    progress: show a progress bar (None: only on a terminal).
    Returns (graph with PA nodes, [fit report per binarized layer], {layer: latent weights},
    [report per refitted float layer], [report per integer layer]), see `methods.CalibrationMethod`
    for the latent weights and `refit_float_layer` for the refit reports.
    """
    if method not in METHODS:
        raise ConversionError(f"unknown calibration method {method!r}; methods: {list(METHODS)}")
    fitter = METHODS[method]
    refitted = ([name for name in float_layers_after(graph, names) if name not in integer]
                if fitter.refit_float else [])
    layers = set(names) | set(refitted) | set(integer)
    rng = np.random.default_rng(seed)
    fits, latent, refits, integer_reports, nodes = [], {}, [], [], []
    last_use = {name: index for index, node in enumerate(graph.nodes) for name in node.inputs}
    kernels = {}  # the float nodes' kernels, made once for the "propagated" method's passes
    # The float network's tensors, and the partly binarized network's where they differ (a tensor
    # not in `binarized` equals its float value); only tensors that a later node reads are kept.
    float_values, binarized = dict(feeds), {}
    bar = tqdm(total=len(layers), desc="calibrating", unit="layer", disable=None if progress is None else not progress,
               leave=False)
    for index, node in enumerate(graph.nodes):
        float_outputs = run_node(node, [float_values[name] for name in node.inputs])
        if node.name in layers:
            tensor = node.inputs[0]
            inputs = binarized.get(tensor, float_values[tensor]) if fitter.sequential else float_values[tensor]
            target = float_outputs[0]
            if node.name in integer:
                node, report = integer_node(node, inputs)
                integer_reports.append(report)
            elif node.name in refitted:
                node, report = refit_float_layer(node, inputs, target)
                refits.append(dict(report, layer=node.name))
            else:
                score_outputs = None
                if fitter.propagates:
                    score_outputs = downstream_scorer(
                        graph, index, names, lambda name: binarized.get(name, float_values[name]),
                        float_values.__getitem__, inputs, target, last_use, kernels)
                layer = LayerToFit(node, inputs, target, weight_bases, act_bases, is_nonnegative(graph, tensor), rng,
                                   act_coding)
                node, latent[node.name], fit = fitter.fit_layer(layer, score_outputs)
                fits.append(dict(fit, layer=node.name, method=method))
            bar.update()
        layer_output = None
        if fitter.sequential and (node.name in layers or any(name in binarized for name in node.inputs)):
            outputs = run_node(node, [binarized.get(name, float_values[name]) for name in node.inputs])
            binarized.update(zip(node.outputs, outputs))
            layer_output = outputs[0]
        if node.name in layers and node.name not in refitted:
            if layer_output is None:  # not sequential: the layer on the float input it was fitted to
                layer_output = run_node(node, [float_values[node.inputs[0]]])[0]
            (fits[-1] if node.name in names else integer_reports[-1])["output_sqnr_db"] = sqnr_db(
                layer_output, float_outputs[0])
        float_values.update(zip(node.outputs, float_outputs))
        for name in set(node.inputs):
            if last_use[name] == index:
                float_values.pop(name, None)
                binarized.pop(name, None)
        nodes.append(node)
    bar.close()
    return Graph(graph.inputs, graph.outputs, nodes, graph.metadata), fits, latent, refits, integer_reports




def downstream_scorer(graph, index, names, live, live_float, inputs, target, last_use, kernels=None,
                      images=PROPAGATION_IMAGES):
    """The `score_outputs` of `select_layer` for the layer graph.nodes[index] (one of the binarized
    layers `names`): given PA nodes [one per fold], the layer's output on the first n = min(images,
    batch) calibration images (image i from nodes[i % folds]) is carried through the float nodes
    graph.nodes[index + 1:] to the input x of the next binarized layer that depends on it (the
    graph's outputs when none does), and sum (x - x_float)^2 / sum x_float^2 is returned, x_float
    being the float network's value there.

    live(name) / live_float(name): the partly binarized / the float network's value [batch, ...]
    of a tensor computed before the layer; inputs: the layer's input and target its float output
    [batch, ...]; last_use: {tensor: index of the last node reading it}; kernels: {node name:
    kernel}, a cache shared by the layers of one calibration.
    """
    node = graph.nodes[index]
    count = min(images, len(inputs))
    known = _inputs_after(graph, index, live, count)
    following = [later.inputs[0] for later in graph.nodes[index + 1:] if later.name in names
                 and later.inputs[0] not in known]
    wanted = following[:1] or list(graph.outputs)
    kernels = {} if kernels is None else kernels
    float_known = _inputs_after(graph, index, live_float, count)
    float_known[node.outputs[0]] = target[:count]
    reference = run_forward(graph, index, float_known, wanted, last_use, kernels)
    float_known = None
    energy = max(sum(float(np.sum(np.asarray(value, dtype=np.float64) ** 2)) for value in reference.values()), 1e-300)

    def score(nodes):
        folds = len(nodes)
        parts = [(fold, run_layer(pa, inputs[fold:count:folds])) for fold, pa in enumerate(nodes) if fold < count]
        output = np.empty((count,) + parts[0][1].shape[1:], parts[0][1].dtype)
        for fold, part in parts:
            output[fold:count:folds] = part
        values = run_forward(graph, index, dict(known, **{node.outputs[0]: output}), wanted, last_use, kernels)
        return sum(float(np.sum((values[name].astype(np.float64) - reference[name]) ** 2)) for name in wanted) / energy

    return score


def _inputs_after(graph, index, live, count):
    """{tensor: live(tensor)[:count]} of the tensors that graph.nodes[index + 1:] or the graph's
    outputs read and that graph.nodes[index:] do not compute."""
    later = graph.nodes[index:]
    produced = {name for later_node in later for name in later_node.outputs}
    needed = {name for later_node in later[1:] for name in later_node.inputs} | set(graph.outputs)
    return {name: live(name)[:count] for name in needed - produced}


def run_forward(graph, index, values, wanted, last_use, kernels):
    """{tensor: value} of the tensors `wanted`, from `values` (every tensor that graph.nodes[index + 1:]
    read and do not compute) by running graph.nodes[index + 1:] (kernels cached in `kernels`) until
    all are computed; a tensor is dropped after its last reader (`last_use`)."""
    values, missing = dict(values), set(wanted) - set(values)
    for position in range(index + 1, len(graph.nodes)):
        if not missing:
            break
        node = graph.nodes[position]
        if node.name not in kernels:
            kernels[node.name] = get_op(node.op, node.name).make_kernel(node)
        values.update(zip(node.outputs, run_node(node, [values[name] for name in node.inputs], kernels[node.name])))
        missing -= set(node.outputs)
        for name in set(node.inputs):
            if last_use[name] == position and name not in wanted:
                values.pop(name)
    return {name: values[name] for name in wanted}


def float_layers_after(graph, names):
    """The float Conv/Gemm nodes of `graph` that come after the first of the nodes `names` in
    graph order and are not among them, in graph order."""
    chosen = set(names)
    positions = [i for i, node in enumerate(graph.nodes) if node.name in chosen]
    if not positions:
        return []
    return [node.name for node in graph.nodes[positions[0] + 1:]
            if node.op in ("Conv", "Gemm") and node.name not in chosen]


def refit_float_layer(node, inputs, target, ridges=REFIT_RIDGES, folds=REFIT_FOLDS):
    """Conv/Gemm `node` with the weights and bias that fit its float output `target` on `inputs`,
    and a report {"ridge", "output_sqnr_db", "trained_output_sqnr_db"} (SQNR of the refitted and
    of the trained layer on `inputs` against `target`):

        (W[o], b[o]) = argmin sum (W[o] . X + b[o] - f[o])^2 + ridge * g * |(W[o], b[o]) - (W0[o], b0[o])|^2

    over all batch and spatial positions; X: the window columns of `inputs` [batch, C, ...] (taps of
    o's group), f = target [batch, O, ...], (W0, b0) the node's trained weights and bias, g the
    mean diagonal of the normal matrix of o's group. `ridge` is the one of `ridges` with the
    smallest total error on the held-out images of `folds`-fold cross-validation (images i with
    i % folds == fold); with a single image, the largest (nothing is held out to trust the data).
    """
    folds = min(folds, len(inputs))
    # Gram matrices: every ridge and fold solves with them.
    parts = [output_statistics(node, inputs[fold::folds], target[fold::folds], keep_columns=False)
             for fold in range(folds)]
    weight = node.params["weight"]
    prior = np.concatenate([weight.reshape(weight.shape[0], -1), node.params["bias"][:, None]], axis=1).astype(
        np.float64)
    ridge = max(ridges)
    if folds > 1:
        errors = [sum(refit_error(parts[fold], solve_refit(sum_statistics(parts[:fold] + parts[fold + 1:]),
                                                             prior, candidate))
                      for fold in range(folds))
                  for candidate in ridges]
        ridge = ridges[int(np.argmin(errors))]
    solution = solve_refit(sum_statistics(parts), prior, ridge)
    refitted = with_weight(node, solution[:, :-1].reshape(weight.shape).astype(np.float32),
                           solution[:, -1].astype(np.float32))
    report = {"ridge": ridge, "output_sqnr_db": sqnr_db(run_layer(refitted, inputs), target),
              "trained_output_sqnr_db": sqnr_db(run_layer(node, inputs), target)}
    return refitted, report



def run_tensors(graph, feeds, tensors, progress=False, description="running"):
    """{tensor: float32 array [batch, ...]} of `tensors`, computed with the engine's kernels
    on the part of `graph` they depend on, in batches of CALIBRATION_BATCH (progress: a bar on
    stderr over the samples, labelled `description`)."""
    tensors = sorted(set(tensors))
    if not tensors:
        return {}
    session = Session(prefix_graph(graph, tensors))
    batch = next(iter(feeds.values())).shape[0]
    parts = {name: [] for name in tensors}
    bar = tqdm(total=batch, desc=description, unit="sample", disable=not progress, leave=False)
    for start in range(0, batch, CALIBRATION_BATCH):
        outputs = session.run(tensors, {k: v[start:start + CALIBRATION_BATCH] for k, v in feeds.items()})
        for name, value in zip(tensors, outputs):
            parts[name].append(value)
        bar.update(outputs[0].shape[0])
    bar.close()
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def prefix_graph(graph, tensors):
    """The sub-graph of the nodes that `tensors` depend on, with `tensors` as its outputs."""
    producers = graph.producers()
    needed, stack = set(), list(tensors)
    while stack:
        node = producers.get(stack.pop())
        if node is not None and node.name not in needed:
            needed.add(node.name)
            stack.extend(node.inputs)
    return Graph(graph.inputs, list(tensors), [node for node in graph.nodes if node.name in needed], {})


