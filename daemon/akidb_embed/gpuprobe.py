"""Whether ONNX Runtime's GPU execution providers can start here, asked of the dynamic linker.

ONNX Runtime finds out by loading the provider's library, and when a CUDA or TensorRT library
is missing it prints a multi-line error dump at every model load, which reads as a failure on a
machine that simply has no GPU. ``ldd`` on the same library lists every missing library without
loading anything into the daemon, so a provider that cannot start is skipped with one line
saying what to install. ldd resolves as the daemon's own loader does (the same environment and
``ld.so`` cache), and the sonames come from the installed build, so x86_64 wheels and NVIDIA's
Jetson builds (other CUDA majors) are each checked against what they were linked with.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable
from pathlib import Path

# The library ONNX Runtime loads for each GPU provider, in onnxruntime/capi.
PROVIDER_LIBRARIES = {"tensorrt": "libonnxruntime_providers_tensorrt.so", "cuda": "libonnxruntime_providers_cuda.so"}
TENSORRT = ("libnvinfer", "libnvonnxparser", "libnvparsers")
CUDA_VERSIONED = ("libcudart", "libcublas", "libcublasLt")  # their soname major is the CUDA major

Ldd = Callable[[Path], str]  # ldd's report on a library


def run_ldd(library: Path) -> str:
    """ldd's report on ``library``; empty when ldd is missing or fails: nothing is known missing then."""
    try:
        done = subprocess.run(["ldd", str(library)], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def missing_libraries(report: str) -> list[str]:
    """The sonames an ldd report says are not found, in its order."""
    return [line.split("=>")[0].strip() for line in report.splitlines() if line.strip().endswith("=> not found")]


def what_to_install(sonames: list[str]) -> list[str]:
    """The packages behind missing sonames, e.g. ``["CUDA 13", "cuDNN 9", "TensorRT 10", "the NVIDIA driver"]``."""
    wanted = list(dict.fromkeys(_component(soname) for soname in sonames))
    if any(name.startswith("CUDA ") for name in wanted):
        wanted = [name for name in wanted if name != "CUDA"]  # libcurand.so.10 is part of the CUDA already named
    return wanted


def _component(soname: str) -> str:
    stem, _, version = soname.partition(".so")
    major = version.lstrip(".").split(".")[0]
    if stem == "libcuda":
        return "the NVIDIA driver"
    if stem.startswith("libcudnn"):
        return f"cuDNN {major}".strip()
    if stem.startswith(TENSORRT):
        return f"TensorRT {major}".strip()
    if stem in CUDA_VERSIONED:
        return f"CUDA {major}".strip()
    if stem.startswith(("libcu", "libnv")):
        return "CUDA"  # libcurand, libcufft, libnvrtc: numbered apart from CUDA itself
    return soname


def why_not(provider: str, capi: Path, ldd: Ldd = run_ldd) -> str | None:
    """Why ``provider`` cannot start here, with the fix; None when its libraries are all found
    (it may still fail to start: no device, a driver too old), or when this build has no such library."""
    library = capi / PROVIDER_LIBRARIES[provider]
    if not library.is_file():
        return None
    missing = missing_libraries(ldd(library))
    if not missing:
        return None
    *most, last = what_to_install(missing)
    install = f"{', '.join(most)} and {last}" if most else last
    return (
        f"{', '.join(missing)} not found; install {install} (on a Jetson: sudo apt install nvidia-jetpack), "
        f"or drop {provider} from providers (akidb-embed.toml or the model's manifest)"
    )


@functools.cache
def why_not_here(provider: str) -> str | None:
    """``why_not`` for the installed onnxruntime, asked once per process: the libraries do not change under it."""
    if provider not in PROVIDER_LIBRARIES:
        return None
    import onnxruntime

    return why_not(provider, Path(onnxruntime.__file__).parent / "capi")
