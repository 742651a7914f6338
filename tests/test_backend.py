"""Execution-provider selection and fallback, and the backend's checks of a model's inputs.

No GPU exists on the test machines: the chain logic is tested with the provider lists a GPU
build reports and a library probe faked to find the CUDA/TensorRT libraries, and the fallback
for real with onnxruntime-gpu (x86_64) when it is installed, where the CUDA and TensorRT
providers are present but their libraries are missing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from akidb_embed import backend
from akidb_embed.backend import BackendError, DeviceMemory, OnnxBackend, provider_chain, run_options
from akidb_embed.tokenize import TextEncoder
from daemon_process import run_daemon

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
MIB = 1 << 20
MEMORY = DeviceMemory(limit=220 * MIB, work=94 * MIB)
CPU_ONLY = DeviceMemory(0, 0)
# ONNX Runtime's own text when a GPU provider cannot start: none of it may reach stdout or stderr.
ORT_ERROR_TEXT = ("EP Error", "Failed to load library", "[E:onnxruntime", "[W:onnxruntime", "Please install")
NEEDS_GPU_BUILD = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs the onnxruntime-gpu build (x86_64)"
)


def libraries_found(provider: str) -> None:
    """The probe's answer on a machine with the CUDA/TensorRT libraries: faked, no GPU can exist here."""
    return None


@pytest.fixture(autouse=True)
def fresh_process_memory() -> None:
    """Each test starts as a new process would: no provider failed yet, no skip said yet."""
    backend._failed_to_start.clear()
    backend._said.clear()


def skip_lines(text: str, provider: str) -> list[str]:
    return [line for line in text.splitlines() if f"execution provider {provider} skipped" in line]


def test_chain_keeps_the_requested_order_with_tensorrt_options(tmp_path: Path) -> None:
    chain = provider_chain(["tensorrt", "cuda", "cpu"], GPU_BUILD, tmp_path / "engines", MEMORY, libraries_found)
    assert [name for name, _ in chain] == GPU_BUILD
    trt_options = chain[0][1]
    assert trt_options["trt_fp16_enable"] == "True"
    assert trt_options["trt_engine_cache_path"] == str(tmp_path / "engines")
    assert trt_options["trt_timing_cache_enable"] == "True"
    assert (tmp_path / "engines").is_dir()
    assert chain[2][1] == {}


def test_an_unusable_engine_cache_costs_the_cache_not_the_provider(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """cache_dir below a regular file: TensorRT keeps its options without the engine cache, and the log says why."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    chain = dict(provider_chain(["tensorrt", "cpu"], GPU_BUILD, blocker / "engines", MEMORY, libraries_found))
    assert chain["TensorrtExecutionProvider"] == {"trt_fp16_enable": "True", "trt_max_workspace_size": str(94 * MIB)}
    assert f"TensorRT engine cache {blocker / 'engines'} cannot be made" in caplog.text and "Not a directory" in caplog.text


def test_gpu_memory_is_bounded_by_the_models_charge(tmp_path: Path) -> None:
    """No GPU runs these options here: the test checks what the daemon hands ONNX Runtime.

    On a Jetson, GPU allocations are system memory: the CUDA arena must grow only by what is
    asked, stop at the model's charge, and shrink after each run; TensorRT's scratch space is
    the working budget.
    """
    chain = dict(provider_chain(["tensorrt", "cuda", "cpu"], GPU_BUILD, tmp_path, MEMORY, libraries_found))
    assert chain["CUDAExecutionProvider"] == {"arena_extend_strategy": "kSameAsRequested", "gpu_mem_limit": str(220 * MIB)}
    assert chain["TensorrtExecutionProvider"]["trt_max_workspace_size"] == str(94 * MIB)
    assert run_options(["CUDAExecutionProvider", "CPUExecutionProvider"]).get_run_config_entry(
        "memory.enable_memory_arena_shrinkage"
    ) == "gpu:0"
    with pytest.raises(RuntimeError):  # no entry: a CPU session has no arena to shrink (it has none at all)
        run_options(["CPUExecutionProvider"]).get_run_config_entry("memory.enable_memory_arena_shrinkage")


def test_chain_skips_what_the_build_lacks_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    chain = provider_chain(["tensorrt", "cuda", "cpu"], ["CPUExecutionProvider"], tmp_path, MEMORY)
    assert [name for name, _ in chain] == ["CPUExecutionProvider"]
    assert "tensorrt skipped: this onnxruntime build does not have it; install onnxruntime-gpu" in caplog.text
    assert "cuda skipped" in caplog.text


def test_cpu_always_ends_the_chain(tmp_path: Path) -> None:
    chain = provider_chain(["cuda"], GPU_BUILD, tmp_path, MEMORY, libraries_found)
    assert [name for name, _ in chain] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_a_provider_missing_its_libraries_is_skipped_and_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """1. the probe finds TensorRT's libraries missing  2. the chain goes on without it, saying why  3. a second
    model's chain skips it too, and the log does not say it again."""
    caplog.set_level(logging.INFO)

    def no_tensorrt(provider: str) -> str | None:
        return "libnvinfer.so.10 not found; install TensorRT 10" if provider == "tensorrt" else None

    for _ in range(2):
        chain = provider_chain(["tensorrt", "cuda", "cpu"], GPU_BUILD, tmp_path, MEMORY, no_tensorrt)
        assert [name for name, _ in chain] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    said = [line.split(" skipped: ")[1] for line in skip_lines(caplog.text, "tensorrt")]
    assert said == ["libnvinfer.so.10 not found; install TensorRT 10"]
    assert not skip_lines(caplog.text, "cuda")


@NEEDS_GPU_BUILD
def test_a_load_without_gpu_libraries_prints_nothing_of_onnxruntimes(
    tiny_models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """1. two loads on TensorRT → CUDA → CPU, with the real probe (no CUDA libraries here)  2. both run on CPU
    3. ONNX Runtime wrote nothing to stdout or stderr  4. one skip line per GPU provider, naming what to install."""
    caplog.set_level(logging.INFO)
    model = tiny_models["encoder"] / "model.onnx"
    for _ in range(2):
        assert OnnxBackend(model, ["tensorrt", "cuda", "cpu"], tmp_path, MEMORY).providers == ["CPUExecutionProvider"]
    out, err = capfd.readouterr()
    assert not [text for text in ORT_ERROR_TEXT if text in out + err], out + err
    (tensorrt,) = skip_lines(caplog.text, "tensorrt")
    (cuda,) = skip_lines(caplog.text, "cuda")
    assert "libnvinfer.so.10" in tensorrt and "install" in tensorrt and "TensorRT 10" in tensorrt
    assert "libcublasLt.so.13" in cuda and "drop cuda from providers" in cuda


@NEEDS_GPU_BUILD
def test_gpu_providers_that_cannot_start_fall_back_to_cpu_once(
    tiny_models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """The probe is faked to find the libraries (no GPU can exist here), so ONNX Runtime really tries the providers.

    1. ask for TensorRT → CUDA → CPU  2. TensorRT fails and our own fallback goes on to CUDA, which ORT drops:
    runs on CPU, each fallback logged, ORT quiet  3. the next load skips CUDA, saying so once.
    """
    caplog.set_level(logging.INFO)
    model = tiny_models["encoder"] / "model.onnx"
    first = OnnxBackend(model, ["tensorrt", "cuda", "cpu"], tmp_path, MEMORY, probe=libraries_found)
    assert first.providers == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider failed" in caplog.text and "falling back" in caplog.text
    assert "CUDAExecutionProvider could not start" in caplog.text
    caplog.clear()
    for _ in range(2):
        second = OnnxBackend(model, ["cuda", "cpu"], tmp_path, MEMORY, probe=libraries_found)
        assert second.providers == ["CPUExecutionProvider"]
    assert [line.split(" skipped: ")[1] for line in skip_lines(caplog.text, "cuda")] == ["it failed to start earlier"]
    out, err = capfd.readouterr()
    assert not [text for text in ORT_ERROR_TEXT if text in out + err], out + err


@NEEDS_GPU_BUILD
def test_at_log_level_debug_onnxruntime_says_why_a_gpu_did_not_start(
    tiny_models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Libraries faked found (no GPU can exist here): at debug, ORT's own reason reaches stderr."""
    caplog.set_level(logging.DEBUG, logger="akidb_embed.backend")
    OnnxBackend(tiny_models["encoder"] / "model.onnx", ["cuda", "cpu"], tmp_path, MEMORY, probe=libraries_found)
    assert "Failed to load library" in capfd.readouterr().err


@NEEDS_GPU_BUILD
def test_a_daemon_without_gpu_libraries_starts_quietly(catalog: Path) -> None:
    """1. a daemon on the default chain (TensorRT → CUDA → CPU), no CUDA libraries here  2. two models load and
    embed on CPU  3. its output holds none of ONNX Runtime's error text, and one skip line per GPU provider."""
    with run_daemon(catalog) as daemon, daemon.client() as client:
        for model in ("bge-tiny", "qwen3-tiny"):
            assert client.embed(["a first run"], model=model).shape[0] == 1
        assert {m["provider"] for m in client.models() if m.get("provider")} == {"CPUExecutionProvider"}
        log = daemon.log()
    assert not [text for text in ORT_ERROR_TEXT if text in log], log
    (tensorrt,) = skip_lines(log, "tensorrt")
    (cuda,) = skip_lines(log, "cuda")
    assert "libnvinfer.so.10" in tensorrt and "libcublasLt.so.13" in cuda


def test_model_with_inputs_the_daemon_cannot_feed_is_refused(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["pixels"], ["out"])],
        "image",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])],
    )
    path = tmp_path / "image.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    with pytest.raises(BackendError, match="has inputs \\['pixels'\\]"):
        OnnxBackend(path, ["cpu"], tmp_path, CPU_ONLY)


def test_backend_runs_a_padded_batch(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    encoder = TextEncoder(tiny_models["encoder"] / "tokenizer.json", 512, "right")
    model = OnnxBackend(tiny_models["encoder"] / "model.onnx", ["cpu"], tmp_path, CPU_ONLY)
    padded = encoder.pad(encoder.encode(["one", "two words here"]))
    states = model.run(padded)
    assert states.shape == (2, padded.ids.shape[1], 32)
    assert padded.mask[0].sum() < padded.mask[1].sum() and np.isfinite(states).all()
