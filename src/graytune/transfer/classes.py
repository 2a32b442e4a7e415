"""The class list TransMiter scores: the task classes first, then seeded auxiliary names.

The list is saved with the adapter: transfer must score the same names in the same order.

Example:
    >>> names = expand_classes(["T-shirt/top", "Trouser"], total=1024, seed=0)
    >>> names[:2]
    ['T-shirt/top', 'Trouser']
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from graytune.assets import wordnet_nouns
from graytune.errors import InvalidInputError


#: WordNet lexicographer files of concrete, visual things: animal, artifact, food, object, plant.
VISUAL_LEXFILES = (5, 6, 13, 17, 20)


def visual_nouns() -> list[str]:
    """The first lemma of every WordNet noun synset naming a concrete, visual thing (sorted, unique)."""
    return sorted({lemmas[0] for lexfile, lemmas, _ in wordnet_nouns().values()
                   if lexfile in VISUAL_LEXFILES and lemmas[0][:1].islower()})  # common nouns, not genera


def expand_classes(task: Sequence[str], total: int, seed: int = 0,
                   vocabulary: Sequence[str] | None = None) -> list[str]:
    """``task`` plus ``total - len(task)`` names drawn with ``seed`` from ``vocabulary``.

    The default vocabulary is WordNet's concrete nouns (``visual_nouns``); the authors
    drew from OpenImages class names, which no package here ships.
    """
    pool_source = visual_nouns() if vocabulary is None else vocabulary
    taken = {t.lower() for t in task}
    pool = sorted({v for v in pool_source if v.lower() not in taken})
    extra = total - len(task)
    if extra < 0 or extra > len(pool):
        raise InvalidInputError(f"cannot make {total} classes from {len(task)} task classes and a vocabulary of "
                                f"{len(pool)} other names; choose total between {len(task)} and {len(task) + len(pool)}")
    return [*task, *random.Random(seed).sample(pool, extra)]
