"""dlib's descriptor network on a runtime other than onnxruntime: MNN, where it runs faster there, or OpenVINO,
where asked for (``FACEGENDER_DESCRIPTOR_RUNTIME``).

The network is a ResNet of 3x3 convolutions. onnxruntime computes them directly, at about an AVX2 core's float32
peak; MNN computes them with Winograd transforms, which need fewer multiplications for the same result (descriptors
within 2e-5 of onnxruntime's, cosine 0.9999999): 3.6 against 6.5 ms per face in batches of 64 on one core of an
AVX2-only AMD EPYC (``benchmarks/descriptor_throughput.py``), the first convolution made one it can transform too
(``converted``). MNN's wheel carries AVX2 kernels and no AVX-512 ones, while onnxruntime has AVX-512 kernels, which
ran the network at 2.9 ms a face on an Intel Xeon (Sapphire Rapids class). AMD's Zen 4 runs AVX-512 as two 256-bit
halves: on one core of a Zen 4 EPYC with AVX-512, MNN took 2.8 against onnxruntime's 4.8 ms a face in batches of
16. So ``auto`` takes MNN on x86-64 CPUs without AVX-512 and on Zen 4 (``cpu``), onnxruntime elsewhere. A single
chip stays on onnxruntime (8.7 against 9.6 ms there: the transforms pay over a batch), and so do a process's first
few batches (``LateNetwork.takes``). Where a stream of small batches (a server's) starts it and the process has a
core to spare, MNN starts in a thread of its own while onnxruntime goes on: no request waits for it.
``FACEGENDER_DESCRIPTOR_RUNTIME`` = ``auto`` (default), ``mnn``, ``onnxruntime`` or ``openvino``.

``openvino`` (``pip install 'facegender[openvino]'``, never chosen by ``auto``) runs the network on OpenVINO, in
bfloat16 on a CPU with native bf16 (``cpu.native_bf16``) and in float32 elsewhere. On one core of a Zen 4 EPYC it
took 2.5 against MNN's 2.95 ms a face, and `predict` over three-face photos 0.93x MNN's time; in bf16 it takes
single chips too (``min_batch`` 1: 3.9 against onnxruntime's 6.6 ms). Its descriptors are
float32's within a cosine of 0.9999 (bf16 keeps 8 bits of each number), which changed 9 of 7,669 validation
answers and no corpus's accuracy by more than 0.07 points (docs/benchmarks.md). It is asked for by name because
its answers are not float32's to the bit, and because it adds 180 MB to an install.

The bundled graph is converted to MNN's format once, on first use, by MNN's own converter in a child
process (it prints progress on stdout), and cached under ``io.cache_dir()`` keyed by the graph's hash and
MNN's version. Where MNN is missing or the conversion fails, onnxruntime runs everything, with one warning; so it
does where OpenVINO fails to load the graph (where it is asked for and not installed, that is a UserError).
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

from .chips import CHIP_SIZE
from .cpu import avx512_in_halves, native_bf16, x86_without_avx512
from .graph_edit import stem_over_space_to_depth
from .io import UserError, atomic_path, cache_dir, glibc, remove_stale_temporaries, used_cache_entry

RUNTIME_ENV = "FACEGENDER_DESCRIPTOR_RUNTIME"
RUNTIMES = ("auto", "mnn", "onnxruntime", "openvino")
# Calls of fewer chips stay on onnxruntime: a single chip runs faster there (8.7 against 9.6 ms of CPU), two
# already faster on MNN (6.4 against 7.5 ms a chip; three 5.4 against 7.5, four 4.6 against 7.7: one core of
# an AVX2-only AMD EPYC, with the first convolution's edit). A server's micro-batches of 3-4 requests
# (benchmarks/serve_load.py, 8 clients on 2 cores, four rounds alternated with MIN_BATCH 8) got 1.12x the
# requests/s (1.04-1.14x), 16% less server CPU a request and a lower p99, for 100 MB more held (242 -> 344
# MiB): FACEGENDER_DESCRIPTOR_RUNTIME=onnxruntime keeps the smaller server. (Before the edit, at 8, MNN
# gained a server too little for that memory.)
MIN_BATCH = 2
# chips per MNN run: 4.0-4.3 ms a face against 4.4-4.5 in runs of 64 (and 8), one AVX2 core; less memory too
MNN_BATCH = 16
# MNN's start (import, load, its weights' transforms: 0.37 s on that core) pays back after about 160 faces at
# 2.3 ms saved each: it starts on a call of START_CHIPS chips (predict's batches over a folder) or once
# START_AFTER have run (a server's requests); until then onnxruntime runs them, so labelling a photo or a
# few starts as fast as before. A folder's batch waits for it (its run goes on for a while, and one core
# gains nothing from a second thread); a server's requests, where it has a core to spare, do not: MNN then
# starts in the background and takes the batches that come once it is ready.
START_CHIPS = 64
START_AFTER = 160
CONVERT_TIMEOUT = 600  # s; about 1 s on an AVX2 core
EDITED = "s2d"  # in the cached file's name: which edit of the graph (graph_edit) it was converted from
# MNN's converter itself, not its `mnnconvert` script: that wrapper sends a usage log to a remote service (and
# pip-installs the logging client where it is missing); this is offline, as the rest of the package.
_CONVERT = ("import sys, _tools; _tools.mnnconvert(['mnnconvert', '-f', 'ONNX', '--modelFile', sys.argv[1], "
            "'--MNNModel', sys.argv[2], '--bizCode', 'facegender'])")


def _asked() -> str:
    return os.environ.get(RUNTIME_ENV, "auto").strip().lower() or "auto"


def chosen_runtime() -> str:
    """``mnn`` or ``onnxruntime``: what runs batches of chips on this machine (the module docstring)."""
    name = _asked()
    if name not in RUNTIMES:
        raise UserError(f"{RUNTIME_ENV}={name}: must be one of {', '.join(RUNTIMES)}")
    if name == "auto":
        name = "mnn" if x86_without_avx512() or avx512_in_halves() else "onnxruntime"
    return name


def _c_stdout():
    """(glibc, the address of its ``stdout`` variable) on Linux with glibc, which lets that variable be set
    (musl's is constant); else None."""
    libc = glibc()
    if libc is None:
        return None
    try:
        variable = ctypes.c_void_p.in_dll(libc, "stdout")
    except ValueError:
        return None
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = libc.fflush.argtypes = [ctypes.c_void_p]
    return libc, variable


_C_STDOUT = _c_stdout()
_C_STDOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet():
    """MNN's library prints notices ("MNN use high precision") on stdout, where predict writes its results;
    they go nowhere (its failures still surface: as exceptions, or as an output of the wrong shape).

    It prints through the C library's ``stdout`` stream, which Python's own writes bypass. With glibc that
    variable points at a stream on /dev/null for the while: file descriptor 1 is never touched, so other
    threads write their rows meanwhile (MNN may then start in a thread of its own; only C code printing
    on stdout from another thread in that second would print to /dev/null too). Elsewhere fd 1 points at
    /dev/null for the while, so only the caller's thread may write."""
    if _C_STDOUT is not None:
        libc, variable = _C_STDOUT
        with _C_STDOUT_LOCK:
            null = libc.fopen(os.devnull.encode(), b"w")
            if null:
                real = variable.value
                libc.fflush(real)  # what C code wrote before goes out now, as it would have
                variable.value = null
                try:
                    yield
                finally:
                    variable.value = real
                    libc.fclose(null)
                return
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        if os.name == "posix":  # what C code left in stdout's buffer goes with it
            ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def converted(graph: Path, key: str, version: str) -> Path:
    """The MNN file of an ONNX graph, converted once and cached: with its first convolution over a
    space-to-depth copy of the chips where the graph allows it (``graph_edit``: 0.5 ms less a face)."""
    target = cache_dir() / "mnn" / f"{graph.stem}-{key}-{EDITED}-mnn{version}.mnn"
    # a killed conversion's 22 MB file, and its edited graph
    remove_stale_temporaries(target.parent, target.name, CONVERT_TIMEOUT + 60)
    if target.is_file():
        return used_cache_entry(target, "*.mnn")  # and those of other versions, unused for a month, go
    with atomic_path(target) as tmp:
        edited = target.parent / f".{target.name}.{os.getpid()}.onnx.tmp"
        try:
            source = edited if stem_over_space_to_depth(graph, edited, CHIP_SIZE) else graph
            done = subprocess.run([sys.executable, "-c", _CONVERT, str(source), str(tmp)], capture_output=True,
                                  text=True, timeout=CONVERT_TIMEOUT)
        finally:
            edited.unlink(missing_ok=True)
        # its converter reports success whatever happened: the file is the proof
        if done.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            last = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"MNN could not convert {graph}: {last[0][:200]}")
    return used_cache_entry(target, "*.mnn")


class LateNetwork:
    """Chips (uint8 N x 150 x 150 x 3) -> the graph's first output, on a runtime loaded late (``_open``).

    Made on first call, or, with ``background`` (a core to spare), in a thread of its own once a stream of
    small calls has earned it (``takes``). Calls are serialised, since one session is not safe to run from two
    threads at once; each runs ``batch`` chips at a time. A kind is a subclass: ``_open`` loads the runtime and
    ``_run`` runs one batch."""

    batch = MNN_BATCH
    min_batch = MIN_BATCH  # calls of fewer chips run on onnxruntime
    # what the name of the descriptors it gives adds to float32's (``onnx_model.DescriptorGraph.name``): nothing
    # where they are float32's within rounding
    name_suffix = ""

    def __init__(self, graph: Path, key: str, background: bool = False):
        self.graph, self.key = graph, key
        self.background = background
        self._lock = threading.Lock()
        self._seen = 0  # chips offered so far
        self._started = False  # a thread has begun loading it
        self._start_lock = threading.Lock()
        self._loaded = threading.Event()  # set once loaded, or once loading failed (``_failure``)
        self._failure: Exception | None = None

    def takes(self, n: int) -> bool:
        """Whether a call of ``n`` chips runs here (else on onnxruntime): ``min_batch`` and more, once started
        (START_CHIPS, START_AFTER). A stream's start, in the background, leaves the calls on onnxruntime
        until it is ready. Once loading has failed it takes them, and the call raises why."""
        if n < self.min_batch:
            return False
        self._seen += n
        if self._loaded.is_set() or n >= START_CHIPS:  # a folder's batch loads it first, or waits for it
            return True
        if self._seen < START_AFTER:
            return False
        if not self.background:
            return True
        if self._begin():
            threading.Thread(target=self._load_once, name="facegender-descriptor-start", daemon=True).start()
        return False

    def load(self) -> None:
        """Load it in this thread, or wait for the thread loading it; raise why it could not be loaded."""
        if self._begin():
            self._load_once()
        self._loaded.wait()
        if self._failure is not None:
            raise self._failure

    def _begin(self) -> bool:
        """True for the one caller that is to load it."""
        with self._start_lock:
            first, self._started = not self._started, True
        return first

    def _load_once(self) -> None:
        try:
            self._open()
        except Exception as e:  # raised to the callers by load()
            self._failure = e
        finally:
            self._loaded.set()

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        chips = np.ascontiguousarray(chips, dtype=np.uint8)
        self.load()
        with self._lock:
            return np.concatenate([self._run(chips[i:i + self.batch]) for i in range(0, len(chips), self.batch)])

    def _open(self) -> None:
        raise NotImplementedError

    def _run(self, chips: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class MNNNetwork(LateNetwork):
    """The network on MNN's CPU backend in float32, through its session API, which lets go of Python's lock
    while it computes (its module API holds it: a detecting thread beside it got 5% of its time; with the
    session API, 57%, the rest of the core's). It starts in the background only where MNN's notices can be
    sent away without touching fd 1 (``_quiet``)."""

    def __init__(self, graph: Path, key: str, background: bool = False):
        super().__init__(graph, key, background and _C_STDOUT is not None)
        self._mnn = self._interpreter = self._session = None

    def _open(self) -> None:
        with _quiet():
            import MNN

            interpreter = MNN.Interpreter(str(converted(self.graph, self.key, MNN.version())))
            # One thread: on two, MNN took 6.6 ms of CPU a face against 4.1 on one, its wall time no better
            # than onnxruntime's on two; predict's and serve's other threads (decoding, detecting) use the
            # other cores.
            session = interpreter.createSession({"precision": "high", "numThread": 1})  # high: float32
        self._mnn, self._interpreter, self._session = MNN, interpreter, session

    def _run(self, chips: np.ndarray) -> np.ndarray:
        mnn, interpreter, session = self._mnn, self._interpreter, self._session
        tensor = interpreter.getSessionInput(session)
        if tuple(tensor.getShape()) != chips.shape:
            interpreter.resizeTensor(tensor, chips.shape)
            interpreter.resizeSession(session)
        # the host tensor in the input's own dimension order: the graph takes N x H x W x 3 and transposes
        tensor.copyFrom(mnn.Tensor(chips.shape, mnn.Halide_Type_Uint8, chips, tensor.getDimensionType()))
        interpreter.runSession(session)
        out = interpreter.getSessionOutput(session)
        shape = tuple(out.getShape())
        if len(shape) != 2 or shape[0] != len(chips):
            raise RuntimeError(f"MNN gave an output of shape {shape} for {len(chips)} chips")
        host = mnn.Tensor(shape, mnn.Halide_Type_Float, np.zeros(shape, np.float32), out.getDimensionType())
        out.copyToHostTensor(host)
        return np.array(host.getNumpyData(), dtype=np.float32).reshape(shape)


class OpenVINONetwork(LateNetwork):
    """The network on OpenVINO's CPU plugin: in bfloat16 where the CPU computes it natively, else float32; one
    thread, not pinned to a core (predict's and serve's other threads share the cores, as with MNN)."""

    def __init__(self, graph: Path, key: str, background: bool = False):
        super().__init__(graph, key, background)
        self.precision = "bf16" if native_bf16() else "f32"
        self.name_suffix = "-bf16" if self.precision == "bf16" else ""  # bf16's descriptors are not float32's
        # In bf16 it takes single chips too: faster there than onnxruntime (3.9 against 6.6 ms a call, one core
        # of an AMD EPYC with AVX-512 BF16), and a face gets bf16's answer whatever the size of its call.
        self.min_batch = 1 if self.precision == "bf16" else MIN_BATCH
        self._request = None

    def _open(self) -> None:
        import openvino

        core = openvino.Core()
        compiled = core.compile_model(core.read_model(str(self.graph)), "CPU", {
            "INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": self.precision, "ENABLE_CPU_PINNING": False})
        self._request = compiled.create_infer_request()

    def _run(self, chips: np.ndarray) -> np.ndarray:
        return np.array(self._request.infer([chips])[0], dtype=np.float32)


def fast_network(graph: Path, key: str, background: bool = False) -> LateNetwork | None:
    """The graph on MNN or OpenVINO where this machine should run it there (``chosen_runtime``) and it is
    installed; else None (onnxruntime runs it). ``background``: a server's stream of calls may start it in a
    thread of its own (``LateNetwork``)."""
    name = chosen_runtime()
    if name == "openvino":
        if importlib.util.find_spec("openvino") is None:
            raise UserError(f"{RUNTIME_ENV}=openvino: OpenVINO is not installed; pip install 'facegender[openvino]'")
        return OpenVINONetwork(graph, key, background)
    if name != "mnn":
        return None
    if importlib.util.find_spec("MNN") is None:  # not imported here: it prints on import, and loads on first use
        if _asked() == "mnn":
            raise UserError(f"{RUNTIME_ENV}=mnn: MNN is not installed; pip install MNN")
        return None
    return MNNNetwork(graph, key, background)


def warn_fallback(error: Exception) -> None:
    warnings.warn(f"descriptors on onnxruntime instead of MNN or OpenVINO ({error})", RuntimeWarning, stacklevel=3)
