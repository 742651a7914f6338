"""Execution-provider selection and fallback, and the backend's checks of a model's inputs.

No GPU exists on the test machines: the chain logic is tested with the provider lists a GPU
build reports, and the fallback for real with onnxruntime-gpu (x86_64) when it is installed,
where the CUDA and TensorRT providers are present but cannot start.
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

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
MIB = 1 << 20
MEMORY = DeviceMemory(limit=220 * MIB, work=94 * MIB)
CPU_ONLY = DeviceMemory(0, 0)


def test_chain_keeps_the_requested_order_with_tensorrt_options(tmp_path: Path) -> None:
    chain = provider_chain(["tensorrt", "cuda", "cpu"], GPU_BUILD, tmp_path / "engines", MEMORY)
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
    chain = dict(provider_chain(["tensorrt", "cpu"], GPU_BUILD, blocker / "engines", MEMORY))
    assert chain["TensorrtExecutionProvider"] == {"trt_fp16_enable": "True", "trt_max_workspace_size": str(94 * MIB)}
    assert f"TensorRT engine cache {blocker / 'engines'} cannot be made" in caplog.text and "Not a directory" in caplog.text


def test_gpu_memory_is_bounded_by_the_models_charge(tmp_path: Path) -> None:
    """No GPU runs these options here: the test checks what the daemon hands ONNX Runtime.

    On a Jetson, GPU allocations are system memory: the CUDA arena must grow only by what is
    asked, stop at the model's charge, and shrink after each run; TensorRT's scratch space is
    the working budget.
    """
    chain = dict(provider_chain(["tensorrt", "cuda", "cpu"], GPU_BUILD, tmp_path, MEMORY))
    assert chain["CUDAExecutionProvider"] == {"arena_extend_strategy": "kSameAsRequested", "gpu_mem_limit": str(220 * MIB)}
    assert chain["TensorrtExecutionProvider"]["trt_max_workspace_size"] == str(94 * MIB)
    assert run_options(["CUDAExecutionProvider", "CPUExecutionProvider"]).get_run_config_entry(
        "memory.enable_memory_arena_shrinkage"
    ) == "gpu:0"
    with pytest.raises(RuntimeError):  # no entry: a CPU session has no arena to shrink (it has none at all)
        run_options(["CPUExecutionProvider"]).get_run_config_entry("memory.enable_memory_arena_shrinkage")


def test_chain_skips_what_the_build_lacks_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    chain = provider_chain(["tensorrt", "cuda", "cpu"], ["CPUExecutionProvider"], tmp_path, MEMORY)
    assert [name for name, _ in chain] == ["CPUExecutionProvider"]
    assert "tensorrt skipped: this onnxruntime build does not have it" in caplog.text
    assert "cuda skipped" in caplog.text


def test_cpu_always_ends_the_chain(tmp_path: Path) -> None:
    chain = provider_chain(["cuda"], GPU_BUILD, tmp_path, MEMORY)
    assert [name for name, _ in chain] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs the onnxruntime-gpu build (x86_64)"
)
def test_gpu_providers_that_cannot_start_fall_back_to_cpu_once(
    tiny_models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. ask for TensorRT → CUDA → CPU with no GPU  2. runs on CPU, each fallback logged  3. the next load skips them."""
    caplog.set_level(logging.INFO)
    backend._failed_to_start.clear()
    model = tiny_models["encoder"] / "model.onnx"
    first = OnnxBackend(model, ["tensorrt", "cuda", "cpu"], tmp_path, MEMORY)
    assert first.providers == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider could not start" in caplog.text
    caplog.clear()
    second = OnnxBackend(model, ["tensorrt", "cuda", "cpu"], tmp_path, MEMORY)
    assert second.providers == ["CPUExecutionProvider"]
    assert "cuda skipped: it failed to start earlier" in caplog.text


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
