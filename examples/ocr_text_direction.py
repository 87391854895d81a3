"""Text direction (0 or 180 degrees) of printed text lines at several crop widths, with the
classifier an OCR package ships, converted once and run at any width.

The model is PaddleOCR's mobile text-direction classifier (`ch_ppocr_mobile_v2.0_cls_infer.onnx`,
a MobileNetV3 with squeeze-and-excitation blocks, opset 11, input [N, 3, height, width] with
height and width left open) as the `rapidocr-onnxruntime` wheel ships it. pabnn converts it at
PA(4, 5) and PA(2, 2), calibrating on crops of one width (192, rapidocr's), and the converted
models run on crops of other widths: a plan is made per input size.

The text lines are real printed text: sentences from the docstrings of Python's standard library,
rendered with the TrueType fonts that ship in the matplotlib wheel (DejaVu Sans, Serif and Mono,
regular and bold) and Pillow's own (Aileron), dark on a light background with random grey levels,
as many words as fill 40..100% of the crop width at height 48 (as a text detector's crop would),
turned by 180 degrees at random (the label), then preprocessed as rapidocr's classifier does
(rapidocr_onnxruntime/ch_ppocr_cls/text_cls.py): resized to height 48 keeping the aspect ratio
(squeezed when wider than the crop), scaled to (x/255 - 0.5)/0.5, padded on the right with 0.

Printed per width: top-1 accuracy against the known orientation of onnxruntime, float pabnn and
the PA models, and the PA models' top-1 agreement with onnxruntime.

    pip install -e ".[examples]"
    python examples/ocr_text_direction.py [--samples 200] [--widths 96 192 320] [--keep-float-below 64]
        [--method selected]

What it printed here (defaults, seed 0; 200 lines per width; method `selected` with the activation
staircase widths as candidates):

    width  onnxruntime acc  float pabnn acc/agree  PA(4,5) acc/agree  PA(2,2) acc/agree
       96            0.860          0.860 / 1.000      0.820 / 0.890      0.775 / 0.765
      192            0.930          0.930 / 1.000      0.905 / 0.935      0.860 / 0.860
      320            0.960          0.960 / 1.000      0.950 / 0.980      0.915 / 0.935

With 1000 lines per width (`--samples 1000 --widths 192 96 320`) and seeds 0, 1 and 2 (each seed
its own 64 calibration crops and text lines), PA(4,5) agreed with onnxruntime on 0.925 / 0.937 /
0.949 of the crops at width 192 (the width rapidocr runs the classifier at), 0.894 / 0.894 / 0.894
at 96 and 0.955 / 0.962 / 0.961 at 320; PA(2,2) on 0.870 / 0.857 / 0.897 at 192.

(Before the staircase widths were candidates: PA(4,5) agreement 0.855 / 0.930 / 0.960, PA(2,2)
0.760 / 0.850 / 0.930; this network played no part in choosing them.) With `--calibration 256`,
PA(4,5) agreement 0.885 / 0.930 / 0.970; calibrated on 64 crops of width 96 instead of 192
(CALIBRATION_WIDTH), 0.865 / 0.905 / 0.920, lower at every width, 96 included: the narrow crops
agree less because more of them lie near the float network's decision boundary (onnxruntime's
two class probabilities within 0.5 of each other on 17.5% / 10.5% / 5.0% of the crops at widths
96 / 192 / 320; PA(4,5) disagrees on 11.0% / 6.5% / 2.0%), not because the calibration saw
another width.

Float pabnn equals onnxruntime at every width; PA(4,5) agrees with it on 89..98% of the crops
(95% was aimed at). This network is a MobileNetV3 at 0.35 width (8 to 200 channels); the default
layer choice (min_fan_in=64: a layer is binarized only if each output sums at least 64 inputs)
binarizes 10 of its layers. With min_fan_in=1 (48 layers binarized: all but the first, the last
and the depthwise convs) agreement was 0.750 / 0.780 / 0.810 at PA(4,5) and 0.535 / 0.565 / 0.575 at PA(2,2): the
per-layer SQNR against the float graph (converters/diagnostics.layer_sqnr) was 11.5 dB after the
first binarized layer already (a 1x1 conv with 8 input channels) and fell to about 4 dB at the
end, mostly in the narrow 1x1 convs. `--keep-float-below 64` (input channels, rather than fan-in)
gave PA(4,5) 0.890 / 0.910 / 0.970 and PA(2,2) 0.750 / 0.855 / 0.935.
"""
import argparse
import importlib.util
import inspect
import math
import os
import re
import time

import numpy as np
import onnx
import onnxruntime
from PIL import Image, ImageDraw, ImageFont

import pabnn
from pabnn.converters import convert, import_onnx
from pabnn.converters.methods import DEFAULT_METHOD, METHODS
from pabnn.engine import Session

HEIGHT = 48
CALIBRATION_WIDTH = 192
SOURCE_MODULES = ("json", "textwrap", "collections", "argparse", "functools", "itertools", "pathlib",
                  "subprocess", "threading", "unittest", "zipfile", "csv", "logging", "random", "statistics")


def model_path():
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        raise SystemExit('the text direction classifier ships in the rapidocr-onnxruntime wheel: '
                         'pip install -e ".[examples]"')
    return os.path.join(os.path.dirname(spec.origin), "models", "ch_ppocr_mobile_v2.0_cls_infer.onnx")


def fonts():
    """TrueType fonts that ship in wheels: matplotlib's DejaVu family and Pillow's default (Aileron)."""
    paths = []
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None:
        folder = os.path.join(os.path.dirname(spec.origin), "mpl-data", "fonts", "ttf")
        for name in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
                     "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"):
            if os.path.exists(os.path.join(folder, name)):
                paths.append(os.path.join(folder, name))
    return paths + [None]  # None: Pillow's built-in Aileron Regular


def sentences():
    """Lines of real English text: the docstrings of some standard-library modules and their members."""
    texts = []
    for module_name in SOURCE_MODULES:
        module = __import__(module_name)
        texts.append(inspect.getdoc(module) or "")
        for _, member in inspect.getmembers(module):
            if (inspect.isfunction(member) or inspect.isclass(member)) and inspect.getdoc(member):
                texts.append(inspect.getdoc(member))
    words = re.sub(r"\s+", " ", " ".join(texts)).split(" ")
    return [word for word in words if word]


def fitting_line(words, font, margin, width, rng):
    """Consecutive words from a random place whose rendering, scaled to height 48, fills 40..100% of
    `width` (as a detector's crop of a line of that length would); a long single word is cut."""
    fill = rng.uniform(0.4, 1.0) * width
    start = int(rng.integers(0, len(words) - 64))

    def scaled_width(text):
        left, top, right, bottom = font.getbbox(text)
        return HEIGHT * (right - left + 2 * margin) / (bottom - top + 2 * margin)

    line = words[start]
    while len(line) > 1 and scaled_width(line) > fill:
        line = line[:-1]
    for word in words[start + 1:start + 64]:
        if scaled_width(line + " " + word) > fill:
            break
        line += " " + word
    return line


def render(words, font_path, size, width, rng):
    """RGB uint8 image of one text line, dark on light, tightly cropped with a small margin, about as
    long as a crop of `width` pixels at height 48 holds."""
    font = ImageFont.truetype(font_path, size) if font_path else ImageFont.load_default(size=size)
    margin = int(rng.integers(2, 8))
    line = fitting_line(words, font, margin, width, rng)
    left, top, right, bottom = font.getbbox(line)
    image_width, image_height = right - left + 2 * margin, bottom - top + 2 * margin
    background = tuple(int(v) for v in rng.integers(190, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 80, 3))
    image = Image.new("RGB", (image_width, image_height), background)
    ImageDraw.Draw(image).text((margin - left, margin - top), line, font=font, fill=ink)
    return image


def preprocess(image, width):
    """rapidocr's cls preprocessing: height 48, aspect kept up to `width`, (x/255-0.5)/0.5, right pad 0.
    Returns float32 [3, 48, width]."""
    resized_width = min(width, int(math.ceil(HEIGHT * image.width / image.height)))
    pixels = np.asarray(image.resize((resized_width, HEIGHT), Image.BILINEAR), dtype=np.float32)
    crop = np.zeros((3, HEIGHT, width), dtype=np.float32)
    crop[:, :, :resized_width] = (pixels.transpose(2, 0, 1) / 255 - 0.5) / 0.5
    return crop


def make_images(count, width, seed):
    """(count text-line images sized for crops of `width`, labels: 1 where turned by 180 degrees)."""
    rng = np.random.default_rng(seed)
    words, font_paths = sentences(), fonts()
    images, labels = [], []
    for _ in range(count):
        image = render(words, font_paths[int(rng.integers(len(font_paths)))], int(rng.integers(24, 48)), width, rng)
        label = int(rng.integers(2))
        images.append(image.rotate(180) if label else image)
        labels.append(label)
    return images, np.array(labels)


def batches(session_run, crops, size=32):
    return np.concatenate([session_run(crops[i:i + size]) for i in range(0, len(crops), size)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="text lines per width")
    parser.add_argument("--calibration", type=int, default=64, help="calibration lines (width 192)")
    parser.add_argument("--widths", type=int, nargs="+", default=[96, 192, 320])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=list(METHODS), default=DEFAULT_METHOD,
                        help=f"calibration method (default: {DEFAULT_METHOD})")
    parser.add_argument("--keep-float-below", type=int, default=0, metavar="CHANNELS",
                        help="also keep float the convs with fewer input channels than this (a diagnostic: "
                             "this network's narrow layers are where PA loses most)")
    arguments = parser.parse_args()

    path = model_path()
    print(f"model: {path} ({os.path.getsize(path) / 1e3:.0f} kB); fonts: "
          f"{[os.path.basename(p) if p else 'Pillow Aileron' for p in fonts()]}; pabnn {pabnn.__version__}")
    calibration_images, _ = make_images(arguments.calibration, CALIBRATION_WIDTH, arguments.seed + 1000)
    calibration = np.stack([preprocess(image, CALIBRATION_WIDTH) for image in calibration_images])
    float_graph = import_onnx(onnx.load(path), example_shapes={"x": [None, 3, HEIGHT, CALIBRATION_WIDTH]})
    models = {"float pabnn": Session(float_graph)}
    narrow = [node.name for node in float_graph.nodes if node.op == "Conv"
              and node.params["weight"].shape[1] * node.attrs.get("group", 1) < arguments.keep_float_below]
    if narrow:
        print(f"kept float as well: the {len(narrow)} convs with fewer than {arguments.keep_float_below} input channels")
    for m, n in ((4, 5), (2, 2)):
        start = time.perf_counter()
        converted = convert(path, calibration=calibration, weight_bases=m, act_bases=n, progress=False,
                            keep_float=narrow or None, method=arguments.method)
        print(f"PA({m},{n}): converted in {time.perf_counter() - start:.1f} s, calibrated on "
              f"{len(calibration)} crops [3, {HEIGHT}, {CALIBRATION_WIDTH}], "
              f"{len(converted.graph.metadata['converter']['binarized'])} layers binarized, method {arguments.method!r}")
        models[f"PA({m},{n})"] = converted.session()
    runtime = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_name = runtime.get_inputs()[0].name

    print(f"\n{arguments.samples} printed text lines per width (new lines for each width, as long as a crop of that "
          "width holds), half of them (at random) turned by 180 degrees")
    print(f"{'width':>5}  {'onnxruntime acc':>15}  " + "  ".join(f"{name + ' acc':>15}  {'agree w/ ORT':>12}"
                                                              for name in models))
    for index, width in enumerate(arguments.widths):
        images, labels = make_images(arguments.samples, width, arguments.seed + index)
        crops = np.stack([preprocess(image, width) for image in images])
        reference = batches(lambda x: runtime.run(None, {input_name: x})[0], crops).argmax(1)
        row = f"{width:>5}  {np.mean(reference == labels):>15.3f}  "
        cells = []
        for name, session in models.items():
            predicted = batches(lambda x: session.run(None, {session.input_names[0]: x})[0], crops).argmax(1)
            cells.append(f"{np.mean(predicted == labels):>15.3f}  {np.mean(predicted == reference):>12.3f}")
        print(row + "  ".join(cells))


if __name__ == "__main__":
    main()
