"""The exception family of pabnn: every error the project raises on bad input is one of these."""


class PabnnError(Exception):
    """Base class of all pabnn errors."""


class FormatError(PabnnError):
    """A .pab file is damaged, truncated, of an unknown version or otherwise not loadable."""


class GraphError(PabnnError):
    """A graph is malformed: unknown op, dangling tensor name, bad attribute or shape."""


class ConversionError(PabnnError):
    """A source model (ONNX or PyTorch) cannot be converted; the message names the node and op."""


class InputError(PabnnError):
    """An input given to Session.run has the wrong name, rank, shape or dtype."""
