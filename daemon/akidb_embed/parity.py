"""The parity gate of ``akidb-embed convert``: a converted graph against sentence-transformers, on real sentences.

Each graph is run the way the daemon runs it (its tokenizer wrapper, its ONNX Runtime backend on the CPU, its
pooling), and each precision has its own bar (``GATES``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import DeviceMemory, OnnxBackend
from .pooling import l2_normalize, pool
from .tokenize import TextEncoder

_BASE_SENTENCES = (
    "Hello!", "Yes.", "Good morning, everyone.", "The cat sat on the mat.", "What is the capital of France?",
    "Paris is the capital and largest city of France.", "How do I reset my password without my email?",
    "Rinse the rice, add two cups of water, then simmer for 18 minutes.", "Error 404: page not found.",
    "The meeting moved from 9:30 a.m. to 2:15 p.m. on Friday, March 14th.", "I can't believe it's already 2025!",
    "Revenue grew 12.5% year over year to $4.2 billion.", "Don't forget: the library closes early (5 pm) today!",
    "Photosynthesis turns light into chemical energy.", "She said he borrowed it; he didn't steal it.",
    "The patient reported chest pain, shortness of breath, and fatigue.", "Apollo 11 landed on the Moon in 1969.",
    "Is it safe to charge a lithium battery at -20 °C?", "The train to Berlin leaves from platform 7 at 06:45.",
    "Quantum computers use qubits that can be in a superposition of states.", "See www.example.com/terms for details.",
    "Embedding models map text to vectors so that similar meanings end up close together.",
    "Our daemon serves ONNX models over a ZeroMQ socket on a small ARM board, without any network connection.",
)
# All of them joined make one real text of over 300 tokens, which exercises truncation at max_length.
DEFAULT_SENTENCES: tuple[str, ...] = (*_BASE_SENTENCES, " ".join(_BASE_SENTENCES))
_BATCH = 8  # texts per run: batches of different lengths, so padding is exercised


@dataclass(frozen=True)
class Gate:
    """The parity a precision must reach: every sentence's cosine, and their mean."""

    min_cosine: float
    mean_cosine: float = 0.0

    def __str__(self) -> str:
        return f"min cosine >= {self.min_cosine}" + (f", mean >= {self.mean_cosine}" if self.mean_cosine else "")


# fp16 rounds weights and activations (all-MiniLM-L6-v2 on the CPU: min 0.999999); int8 loses most on short texts.
GATES = {"fp32": Gate(0.9999), "fp16": Gate(0.999), "int8": Gate(0.97, 0.99)}


@dataclass(frozen=True)
class Yardstick:
    """sentence-transformers' vectors for ``texts``, and the settings the daemon embeds them with."""

    reference: np.ndarray
    texts: list[str]
    tokenizer: Path
    max_length: int
    padding_side: str
    pooling: str
    normalize: bool
    progress: Callable[[str], None]

    def check(self, model: Path, precision: str) -> tuple[np.ndarray, str | None]:
        """Per-sentence cosines of ``model``, and what misses ``precision``'s gate (None when it passes)."""
        got = self.embed(model)
        cos = np.sum(l2_normalize(self.reference.astype(np.float64)) * l2_normalize(got.astype(np.float64)), axis=1)
        low, mean, worst, gate = float(cos.min()), float(cos.mean()), int(np.argmin(cos)), GATES[precision]
        if low >= gate.min_cosine and mean >= gate.mean_cosine:
            return cos, None
        return cos, (f"min cosine {low:.6f}, mean {mean:.6f} (need {gate} for {precision}); worst sentence #{worst} "
                     f"(cosine {cos[worst]:.6f}): {self.texts[worst][:80]!r}")

    def embed(self, model: Path) -> np.ndarray:
        """The texts' vectors from the ONNX graph ``model``, embedded as the daemon does on the CPU."""
        encoder = TextEncoder(self.tokenizer, self.max_length, self.padding_side)
        backend = OnnxBackend(model, ("cpu",), model.parent, DeviceMemory(0, 0))  # GPU-only settings: unused on CPU
        vectors = []
        try:
            for start in range(0, len(self.texts), _BATCH):
                batch = encoder.pad(encoder.encode(self.texts[start : start + _BATCH]))
                vectors.append(pool(backend.run(batch), batch.mask, self.pooling))
                self.progress(f"checking parity {min(start + _BATCH, len(self.texts))}/{len(self.texts)}")
        finally:
            backend.close()
        embeddings = np.concatenate(vectors)
        return l2_normalize(embeddings) if self.normalize else embeddings
