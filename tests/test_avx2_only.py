"""tools/avx2_only/run: a command run as on a CPU without AVX-512, on one that has it (the way this project's
AVX2 path is measured on an AVX-512 machine). It skips where the machine cannot do that: no AVX-512 to hide
(an AVX2-only CPU runs that path natively), no CPUID faulting, no C compiler or no mount namespace."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

TOOL = ROOT / "tools" / "avx2_only" / "run"

# what a process sees of its CPU, and the faces the default detector finds in the astronaut
PROBE = """
import json
import numpy as np
from numpy._core._multiarray_umath import __cpu_features__ as features
from skimage.data import astronaut
from PIL import Image
from facegender import blazeface, cpu
from facegender.detect import FaceDetector
faces = FaceDetector("blazeface").detect(Image.fromarray(astronaut()))
print(json.dumps({"numpy": {k: bool(features[k]) for k in ("AVX2", "AVX512F")}, "without": cpu.x86_without_avx512(),
                  "narrow": bool(blazeface.NARROW_WHERE()), "faces": [[*f.box, *f.left_eye, *f.right_eye] for f in faces]}))
"""


def _unusable() -> str | None:
    """Why the tool cannot run here, or None."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return "the tool hides x86-64 features on Linux"
    flags = Path("/proc/cpuinfo").read_text().split()
    if "avx512f" not in flags:
        return "this CPU has no AVX-512 to hide (it runs the AVX2 path natively)"
    if "cpuid_fault" not in flags:
        return "this kernel or CPU offers no CPUID faulting"
    if shutil.which("cc") is None or shutil.which("unshare") is None:
        return "the tool needs a C compiler (cc) and unshare"
    tried = subprocess.run([TOOL, "true"], capture_output=True, text=True, check=False)
    if tried.returncode != 0:
        return f"the tool cannot run here: {tried.stderr.strip()[-200:]}"
    return None


@pytest.fixture(scope="module")
def usable() -> None:
    pytest.importorskip("skimage.data", reason="the astronaut photo comes with scikit-image")
    why = _unusable()
    if why:
        pytest.skip(why)


def probe(*wrapper: str) -> dict:
    done = subprocess.run([*wrapper, sys.executable, "-c", PROBE], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_under_the_tool_the_avx2_path_finds_the_faces_the_avx512_one_does(usable):
    native, avx2 = probe(), probe(str(TOOL))
    assert native["numpy"] == {"AVX2": True, "AVX512F": True} and not native["without"] and not native["narrow"]
    # cpuid (numpy's and onnxruntime's choice of kernels) and /proc/cpuinfo (facegender's own) both lose AVX-512
    assert avx2["numpy"] == {"AVX2": True, "AVX512F": False} and avx2["without"] and avx2["narrow"]
    # the 8-float graph on AVX2 kernels: the same face, boxes and eyes within a hundredth of a pixel
    assert len(native["faces"]) == len(avx2["faces"]) == 1
    assert max(abs(a - b) for a, b in zip(native["faces"][0], avx2["faces"][0])) < 0.01


def test_under_the_tool_a_real_crash_still_crashes_and_faulthandler_still_reports_it(usable):
    crash = "import ctypes; ctypes.string_at(0)"
    plain = subprocess.run([TOOL, sys.executable, "-c", crash], capture_output=True, text=True, check=False)
    assert plain.returncode == -11  # SIGSEGV, not swallowed as if it were a cpuid
    reported = subprocess.run([TOOL, sys.executable, "-X", "faulthandler", "-c", f"import numpy, onnxruntime; {crash}"],
                              capture_output=True, text=True, check=False)
    assert reported.returncode == -11
    assert "Fatal Python error: Segmentation fault" in reported.stderr, reported.stderr[-1000:]
