"""Fortune quotes by topic (Debian ``fortunes``): a second, differently distributed text domain.

Example:
    >>> data = load_fortunes()
    >>> data.class_names
    ('computers', 'food', 'love', 'science', 'sports', 'politics', 'medicine', 'law')
"""

from __future__ import annotations

import random

import torch

from graytune.assets import debian_files
from graytune.data.labeled import LabeledTexts

TOPICS = ("computers", "food", "love", "science", "sports", "politics", "medicine", "law")


def load_fortunes(per_class: int = 240, seed: int = 0) -> LabeledTexts:
    """Up to ``per_class`` quotes per topic, drawn with ``seed``; whitespace folded."""
    files = {p.name: p for p in debian_files("fortunes") if p.parent.name == "fortunes" and not p.suffix}
    rng = random.Random(seed)
    texts, labels = [], []
    for label, topic in enumerate(TOPICS):
        raw = files[topic].read_text(encoding="utf-8", errors="replace")
        quotes = [" ".join(q.split()) for q in raw.split("\n%\n") if q.strip()]
        for quote in rng.sample(quotes, min(per_class, len(quotes))):
            texts.append(quote)
            labels.append(label)
    return LabeledTexts("fortunes", tuple(texts), torch.tensor(labels), TOPICS)
