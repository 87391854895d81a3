"""Diagnostics of a converted model against its float original: per-layer SQNR and accuracy."""
import numpy as np

from pabnn.engine.report import pa_kind

from .calibration import run_tensors
from .layer_fit import sqnr_db

PA_OPS = ("PAConv", "PALinear")


def layer_sqnr(pa_graph, float_graph, feeds, progress=False):
    """Per binarized layer of `pa_graph`, and per float layer that calibration refitted: the SQNR
    in dB of its output against the same tensor of `float_graph` (both run end to end on `feeds`,
    so a layer's error includes what the layers before it lost): 10 log10(sum f^2 / sum (y - f)^2).

    Returns [{"layer", "kind", "output", "sqnr_db"}] in graph order; kind is "PA(M,N)" or
    "refit" (a float layer refitted by calibration). progress: bars on stderr over the samples.
    """
    refitted = {refit["layer"] for refit in pa_graph.metadata.get("converter", {}).get("refitted_float", [])}
    float_tensors = {name for node in float_graph.nodes for name in node.outputs}
    layers = [node for node in pa_graph.nodes
              if (node.op in PA_OPS or node.name in refitted) and node.outputs[0] in float_tensors]
    tensors = [node.outputs[0] for node in layers]
    approximated = run_tensors(pa_graph, feeds, tensors, progress, "running the converted model")
    exact = run_tensors(float_graph, feeds, tensors, progress, "running the float model")
    return [{"layer": node.name, "kind": _kind(node), "output": node.outputs[0],
             "sqnr_db": sqnr_db(approximated[node.outputs[0]], exact[node.outputs[0]])}
            for node in layers]


def _kind(node):
    if node.op in PA_OPS:
        return pa_kind(node)
    return "refit"


def classification_metrics(logits, labels=None, float_logits=None):
    """Top-1 (and top-5 when there are more than 5 classes) accuracy of `logits` [batch, classes]
    against integer `labels` [batch]; with `float_logits`, the top-1 agreement with them and the
    mean cosine similarity cos(y, f) = y.f / (|y| |f|) of the logit vectors; with both, the
    paired comparison of `top1_change` (see that function) under "float_top1", "top1_change",
    "top1_change_ci95", "gained" and "lost".
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, classes], found shape {list(logits.shape)}")
    metrics = {"samples": int(logits.shape[0]), "classes": int(logits.shape[1])}
    if labels is not None:
        labels = np.asarray(labels).ravel()
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {logits.shape[0]} samples")
        ranked = np.argsort(-logits, axis=1)
        metrics["top1"] = float(np.mean(ranked[:, 0] == labels))
        if logits.shape[1] > 5:
            metrics["top5"] = float(np.mean(np.any(ranked[:, :5] == labels[:, None], axis=1)))
    if float_logits is not None:
        float_logits = np.asarray(float_logits, dtype=np.float64)
        metrics["top1_agreement"] = float(np.mean(logits.argmax(axis=1) == float_logits.argmax(axis=1)))
        norms = np.linalg.norm(logits, axis=1) * np.linalg.norm(float_logits, axis=1)
        cosines = np.sum(logits * float_logits, axis=1) / np.maximum(norms, 1e-300)
        metrics["logit_cosine"] = float(np.mean(cosines))
    if labels is not None and float_logits is not None:
        metrics.update(top1_change(logits.argmax(axis=1) == labels, float_logits.argmax(axis=1) == labels))
    return metrics


def top1_change(correct, float_correct):
    """The paired comparison of two classifiers on the same samples (bool [batch] each: sample
    right or not): top-1 change d = (c - b) / n against the float one, with b samples lost (right
    in float, wrong here) and c gained, and the half width of its normal-approximation 95%
    interval, 1.96 sqrt(b + c - (b - c)^2 / n) / n (the standard error of a paired difference).
    Samples both get right or both get wrong carry no information on d, so the interval is set by
    the disagreements alone: with 1000 samples and 10 of them, it is about +-0.6 points.
    -> {"float_top1", "top1_change", "top1_change_ci95", "gained", "lost"}."""
    correct, float_correct = np.asarray(correct, dtype=bool), np.asarray(float_correct, dtype=bool)
    samples = correct.shape[0]
    lost = int(np.sum(float_correct & ~correct))
    gained = int(np.sum(correct & ~float_correct))
    variance = max(lost + gained - (gained - lost) ** 2 / samples, 0.0)
    return {"float_top1": float(np.mean(float_correct)), "top1_change": (gained - lost) / samples,
            "top1_change_ci95": 1.96 * np.sqrt(variance) / samples, "gained": gained, "lost": lost}


def load_float_graph(source):
    """The float Graph of an ONNX file as convert() sees it (imported, BatchNorm folded)."""
    from .convert import _load_source
    from .onnx_import import import_onnx
    from .passes import fold_batchnorm

    proto, _ = _load_source(source, None)
    return fold_batchnorm(import_onnx(proto))


def single_input_feeds(graph, array, what):
    """{graph input: array} for a single-input graph (what: the name used in errors)."""
    from pabnn.engine.errors import PabnnError

    if len(graph.inputs) != 1:
        raise PabnnError(f"the model has inputs {[i.name for i in graph.inputs]}; {what} feeds single-input models")
    return {graph.inputs[0].name: np.ascontiguousarray(array, dtype=np.float32)}
