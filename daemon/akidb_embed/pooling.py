"""Pooling of token states into one vector per text, and normalization. Pure numpy."""

from __future__ import annotations

import numpy as np


def mean(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Average of the states of the real (unmasked) tokens."""
    weights = mask[..., None].astype(states.dtype)
    return (states * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def cls(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """State of the first real token of each row (BERT's [CLS]), whichever side the padding is on."""
    first = np.argmax(mask, axis=1)
    return states[np.arange(states.shape[0]), first]


def last_token(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """State of the last real token of each row, whichever side the padding is on."""
    seq = mask.shape[1]
    last = seq - 1 - np.argmax(mask[:, ::-1], axis=1)
    return states[np.arange(states.shape[0]), last]


POOLERS = {"mean": mean, "cls": cls, "last_token": last_token}


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def pool(states: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """One float32 vector per row of ``states`` [batch, seq, hidden]."""
    return POOLERS[pooling](states, mask).astype(np.float32, copy=False)
