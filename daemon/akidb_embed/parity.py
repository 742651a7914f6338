"""The parity gate of ``akidb-embed convert``: a converted graph against sentence-transformers, on real sentences.

Each graph is run the way the daemon runs it (its tokenizer wrapper, its ONNX Runtime backend on the CPU, its
pooling), and each precision has its own bar (``GATES``). The golden texts the daemon's load self-test uses
(selftest.py) are chosen and measured here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backend import DeviceMemory, OnnxBackend
from .modelfolder import ConversionError
from .pooling import l2_normalize, pool
from .selftest import GOLDEN_FILE, cosines, pooled, write_golden
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

# The self-test's texts, with their languages: short to long, several scripts, digits and symbols.
GOLDEN_TEXTS: tuple[tuple[str, str], ...] = (
    ("en", "Hi!"),
    ("en", "What is the capital of France?"),
    ("en", "Rinse the rice, add two cups of water, then simmer for 18 minutes before you serve it."),
    ("en", "Embedding models map text to vectors so that similar meanings end up close together. A search "
           "engine compares the vector of a question with those of many passages and returns the closest ones, "
           "which works across paraphrases, typos and even languages when the model was trained for it."),
    ("en", "Error 404: page not found. See www.example.com/help (code E-17, 2025-03-14, 12.5% off)."),
    ("de", "Der Zug nach Berlin fährt um 6:45 Uhr von Gleis 7 ab."),
    ("de", "Wie setze ich mein Passwort zurück, wenn ich keinen Zugriff mehr auf meine E-Mail-Adresse habe?"),
    ("es", "¿Dónde está la estación de tren más cercana?"),
    ("es", "La fotosíntesis convierte la energía de la luz en energía química que las plantas almacenan."),
    ("fr", "Le chat dort sur le canapé pendant que la pluie tombe dehors."),
    ("ru", "Москва — столица и крупнейший город России."),
    ("ru", "Как сбросить пароль, если я не помню адрес электронной почты?"),
    ("zh", "北京是中国的首都。"),
    ("zh", "机器学习模型把文本变成向量，使意思相近的句子彼此靠近。"),
    ("ja", "東京駅から新幹線で大阪まで約二時間半かかります。"),
)
# Each of the model's named prompts is applied to these two (a query and a passage).
GOLDEN_PROMPTED = ("What is the capital of France?", "Paris is the capital and largest city of France.")
# The longest golden text: just over max_length, so truncation is exercised, but at most this many tokens: an
# 8192-token text would make every load of a large model seconds slower, and truncation is the same code at any length.
GOLDEN_LONGEST = 512
# The self-test's tolerance: fp32 must match sentence-transformers (as its parity gate, less a little for other
# providers' rounding); int8 and fp16 get what convert measured less GOLDEN_MARGIN. The margin covers other kernels
# (CUDA/TensorRT, another CPU's int8 instructions, other thread counts) computing the same graph with other rounding,
# and stays far above what a real fault costs (wrong pooling, tokenizer or weights drop cosines to ~0.9 or less).
GOLDEN_FP32 = 0.999
GOLDEN_MARGIN = 0.01


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
        vectors = []
        with self._session(model) as (encoder, backend):
            for start in range(0, len(self.texts), _BATCH):
                batch = encoder.pad(encoder.encode(self.texts[start : start + _BATCH]))
                vectors.append(pool(backend.run(batch), batch.mask, self.pooling))
                self.progress(f"checking parity {min(start + _BATCH, len(self.texts))}/{len(self.texts)}")
        embeddings = np.concatenate(vectors)
        return l2_normalize(embeddings) if self.normalize else embeddings

    def golden_cosines(self, model: Path, texts: list[str], reference: np.ndarray) -> np.ndarray:
        """Per-text cosines of ``model`` against ``reference``, computed as the daemon's self-test does (on the CPU)."""
        with self._session(model) as (encoder, backend):
            return cosines(reference, pooled(encoder, backend, encoder.encode(texts))[self.pooling])

    @contextmanager
    def _session(self, model: Path) -> Iterator[tuple[TextEncoder, OnnxBackend]]:
        encoder = TextEncoder(self.tokenizer, self.max_length, self.padding_side)
        backend = OnnxBackend(model, ("cpu",), model.parent, DeviceMemory(0, 0))  # GPU-only settings: unused on CPU
        try:
            yield encoder, backend
        finally:
            backend.close()


def golden_texts(prompts: Mapping[str, str], tokenizer: Path, max_length: int) -> list[str]:
    """The final golden texts of a model: GOLDEN_TEXTS, a text over max_length, each prompt on GOLDEN_PROMPTED."""
    return [*(text for _, text in GOLDEN_TEXTS), _longest(tokenizer, min(max_length, GOLDEN_LONGEST)),
            *(prefix + text for prefix in prompts.values() for text in GOLDEN_PROMPTED)]


def write_golden_vectors(st: Any, yardstick: Yardstick, prompts: Mapping[str, str], folder: Path,
                         precision: str) -> float:
    """Write the golden texts' vectors by the SentenceTransformer ``st`` and their token counts into ``folder``; the
    self-test's tolerance, checked against what the graph there gives them as the daemon will compute it."""
    texts = golden_texts(prompts, yardstick.tokenizer, yardstick.max_length)
    # prompt="": the texts carry their prompts already, and no default prompt may be added to any
    vectors = st.encode(texts, batch_size=8, convert_to_numpy=True, prompt="")
    tokens = st.preprocess(texts, prompt="")["attention_mask"].sum(dim=1).tolist()
    cos = yardstick.golden_cosines(folder / "model.onnx", texts, vectors)
    low, tolerance = float(cos.min()), golden_tolerance(precision, float(cos.min()))
    if low < tolerance:
        worst = int(cos.argmin())
        raise ConversionError(f"the golden texts reach min cosine {low:.6f}, below the self-test's {tolerance} for "
                              f"{precision}: the daemon would refuse the model (worst text #{worst}: "
                              f"{texts[worst][:60]!r}). Nothing was written")
    write_golden(folder / GOLDEN_FILE, texts, vectors, tokens)
    yardstick.progress(f"golden vectors: {len(texts)} texts, min cosine {low:.6f}; the load self-test needs {tolerance}")
    return tolerance


def golden_tolerance(precision: str, measured: float) -> float:
    """The self-test's min cosine for a model of ``precision`` whose golden texts measured ``measured`` (rounded down)."""
    return GOLDEN_FP32 if precision == "fp32" else math.floor((measured - GOLDEN_MARGIN) * 1e4) / 1e4


def _longest(tokenizer: Path, limit: int) -> str:
    """English paragraphs joined until the text has more than ``limit`` tokens."""
    encoder = TextEncoder(tokenizer, limit, "right")
    paragraphs = [text for language, text in GOLDEN_TEXTS if language == "en"]
    text = " ".join(paragraphs)
    while not encoder.encode([text])[0].truncated:
        text = f"{text} {' '.join(paragraphs)}"
    return text
