"""The GPU provider probe: ldd reports parsed into what is missing and what to install.

No GPU exists on the test machines: the reports are real ldd output recorded here, and the
probe runs for real against the installed onnxruntime-gpu (x86_64) when it is installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort
import pytest
from akidb_embed.gpuprobe import PROVIDER_LIBRARIES, missing_libraries, run_ldd, what_to_install, why_not, why_not_here

LDD = Path(__file__).parent / "fixtures" / "ldd"


def test_missing_libraries_are_read_from_a_real_ldd_report() -> None:
    report = (LDD / "tensorrt-x86_64-no-gpu.txt").read_text()
    assert missing_libraries(report) == ["libcublas.so.13", "libnvinfer.so.10", "libnvonnxparser.so.10", "libcudnn.so.9"]
    assert missing_libraries((LDD / "shared-all-found.txt").read_text()) == []
    assert missing_libraries("") == []  # no ldd: nothing known missing


def test_the_fix_names_the_packages_with_the_majors_the_build_was_linked_with() -> None:
    cuda = missing_libraries((LDD / "cuda-x86_64-no-gpu.txt").read_text())
    assert what_to_install(cuda) == ["CUDA 13", "the NVIDIA driver"]  # libcurand.so.10 is part of CUDA 13
    # A Jetson build (JetPack 6) links CUDA 12: the fix follows the sonames, not this machine's build.
    assert what_to_install(["libcudart.so.12", "libnvinfer.so.10", "libcudnn.so.9"]) == ["CUDA 12", "TensorRT 10", "cuDNN 9"]
    assert what_to_install(["libcufft.so.11"]) == ["CUDA"]
    assert what_to_install(["libstrange.so.2"]) == ["libstrange.so.2"]


def test_why_not_says_what_is_missing_and_the_fix(tmp_path: Path) -> None:
    """1. a provider library whose ldd report lacks libraries  2. one line: the sonames, what to install, how to opt out."""
    (tmp_path / PROVIDER_LIBRARIES["cuda"]).write_bytes(b"")
    reason = why_not("cuda", tmp_path, ldd=lambda library: (LDD / "cuda-x86_64-no-gpu.txt").read_text())
    assert reason == (
        "libcublasLt.so.13, libcublas.so.13, libcurand.so.10, libcuda.so.1 not found; install CUDA 13 and the NVIDIA "
        "driver (on a Jetson: sudo apt install nvidia-jetpack), or drop cuda from providers (akidb-embed.toml or the "
        "model's manifest)"
    )
    assert why_not("cuda", tmp_path, ldd=lambda library: (LDD / "shared-all-found.txt").read_text()) is None
    assert why_not("tensorrt", tmp_path, ldd=lambda library: pytest.fail("no library, nothing to ask ldd")) is None


def test_run_ldd_without_ldd_knows_nothing_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no ldd on the PATH
    assert run_ldd(Path(os.__file__)) == ""


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs the onnxruntime-gpu build (x86_64)"
)
def test_the_installed_build_is_probed_for_real() -> None:
    """No GPU and no CUDA libraries here: the real ldd on the real provider libraries finds them missing."""
    assert "libcublasLt.so" in (why_not_here("cuda") or "")
    assert "libnvinfer.so" in (why_not_here("tensorrt") or "")
    assert why_not_here("cpu") is None
