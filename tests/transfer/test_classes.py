"""TransMiter's auxiliary classes: balanced over WordNet's noun categories, never the task's own categories' words.

Measured on WordNet's supersense task (``wordnet-supersense:base-to-novel``: 5 base, 5 novel categories), where
graytune's earlier draw (``concrete``) took 96-99 % of its names from the base classes' categories.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from graytune import InvalidInputError
from graytune.assets import wordnet_nouns
from graytune.data.labeled import SUPERSENSES
from graytune.transfer.classes import (BALANCED_CATEGORIES, category_nouns, expand_classes, named_categories,
                                       visual_nouns)

TASK = list(SUPERSENSES.values())  # the supersense task's class names, base (first 5) then novel
BASE, NOVEL = list(SUPERSENSES)[:5], list(SUPERSENSES)[5:]


def words_of(categories: list[int]) -> set[str]:
    """Every lemma of every synset in ``categories`` (lower case): a name 'from' them in any of its senses."""
    return {lemma.lower() for lexfile, lemmas, _ in wordnet_nouns().values() if lexfile in categories
            for lemma in lemmas}


def share(names: list[str], words: set[str]) -> float:
    return sum(n.lower() in words for n in names) / len(names)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auxiliary_names_on_wordnet_come_from_the_base_categories_no_more_than_chance(seed: int) -> None:
    aux = expand_classes(TASK, 1024, seed)[len(TASK):]
    assert len(aux) == len(set(aux)) == 1014 and not set(aux) & set(TASK)
    # chance: a balanced draw picks each of its categories equally, so the base classes' 5 categories would
    # hold 5 / 25 of the names; here they (and the novel classes' 5) are left out, every sense of every word
    base, novel = share(aux, words_of(BASE)), share(aux, words_of(NOVEL))
    chance = len(BASE) / len(BALANCED_CATEGORIES)
    assert base <= chance and novel <= chance, (base, novel)
    assert base == novel == 0.0
    old = expand_classes(TASK, 1024, seed, draw="concrete")[len(TASK):]
    assert share(old, words_of(BASE)) > 0.95 > 0.1 > share(old, words_of(NOVEL))  # the skew the old draw had


def test_without_named_categories_every_category_gives_an_equal_share() -> None:
    task = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert named_categories(task) == []
    aux = expand_classes(task, 1024, seed=0)[len(task):]
    assert len(aux) == len(set(aux)) == 1014
    home = {n: c for c, nouns in category_nouns().items() for n in nouns}
    counts = Counter(home[n] for n in aux)
    small = {c for c, nouns in category_nouns().items() if len(nouns) < 1014 // len(BALANCED_CATEGORIES)}
    assert small == {16}  # noun.motive: 40 names, all taken; the others share the rest
    assert counts[16] == len(category_nouns()[16])
    others = [counts[c] for c in BALANCED_CATEGORIES if c not in small]
    assert max(others) - min(others) <= 1 and sum(counts.values()) == 1014
    assert abs(sum(counts[c] for c in BASE) / 1014 - len(BASE) / len(BALANCED_CATEGORIES)) < 0.01


def test_categories_named_by_task_classes_are_left_out() -> None:
    assert named_categories(["animal", "noun.plant", "Trouser", "animal"]) == [5, 20]
    pools = category_nouns([5])
    assert 5 not in pools and not words_of([5]) & {n.lower() for nouns in pools.values() for n in nouns}


def test_the_concrete_draw_is_the_earlier_one() -> None:
    """``concrete`` regenerates the tables made before the balanced draw: the same names in the same order."""
    task = ["T-shirt/top", "Trouser"]
    pool = sorted({v for v in visual_nouns() if v.lower() not in {"t-shirt/top", "trouser"}})
    assert expand_classes(task, 300, seed=4, draw="concrete") == [*task, *random.Random(4).sample(pool, 298)]


def test_draws_are_seeded_and_unknown_ones_refused() -> None:
    assert expand_classes(TASK, 64, seed=3) == expand_classes(TASK, 64, seed=3) != expand_classes(TASK, 64, seed=4)
    with pytest.raises(InvalidInputError, match="draw must be one of balanced, concrete; got 'balance'.*'balanced'"):
        expand_classes(TASK, 64, draw="balance")
    with pytest.raises(InvalidInputError, match="cannot make 100000 classes"):
        expand_classes(TASK, 100_000)
