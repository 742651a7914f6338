"""Real sentences to embed: Debian's fortunes packages (English, German, Spanish)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
# Quotes and sayings; the art and ASCII-drawing files are not sentences.
FILES = ("computers", "education", "literature", "people", "science", "wisdom", "work", "de/wusstensie", "es/ciencia.fortunes")


def fortune_sentences(count: int, min_chars: int = 20, max_chars: int = 400) -> list[str]:
    """``count`` distinct fortunes, whitespace folded, in a fixed order across the files."""
    per_file = [_entries(FORTUNES / name, min_chars, max_chars) for name in FILES if (FORTUNES / name).is_file()]
    if not per_file:
        raise FileNotFoundError(f"no fortunes under {FORTUNES}: apt-get install fortunes fortunes-de fortunes-es")
    picked: list[str] = []
    # Round-robin across files, so a small sample still mixes topics and languages.
    for group in itertools.zip_longest(*per_file):
        picked += [text for text in group if text is not None and text not in picked]
        if len(picked) >= count:
            return picked[:count]
    return picked


def _entries(path: Path, min_chars: int, max_chars: int) -> list[str]:
    raw = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
    texts = (re.sub(r"\s+", " ", entry).strip() for entry in raw)
    return [text for text in texts if min_chars <= len(text) <= max_chars]
