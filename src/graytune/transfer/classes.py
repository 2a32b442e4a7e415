"""The class list TransMiter scores: the task classes first, then seeded auxiliary names.

The list is saved with the adapter: transfer must score the same names in the same order.

Two draws of the auxiliary names, from WordNet's nouns (Debian ``wordnet-base``):

- ``balanced`` (the default): as many names from each WordNet noun category (its 25 lexicographer files
  ``noun.act`` … ``noun.time``; ``noun.Tops``, whose words name the categories themselves, is left out),
  drawn uniformly within each, leaving out every category a task class names (WordNet's supersense
  task: the class ``animal`` leaves out ``noun.animal``) and every word of theirs. No category is
  favoured, so no task whose classes are categories (or lie in a few of them) gets auxiliary names that
  are mostly its own classes' words.
- ``concrete``: graytune's earlier draw, kept to regenerate the tables made with it: uniform over the
  common nouns of five concrete categories (animal, artifact, food, object, plant). On WordNet's
  supersense task 96–99 % of those names are words of the base classes' categories (animal, artifact,
  food, plant; person through polysemy) against 5–6 % of the novel ones'.

The authors draw ``random.sample`` from OpenImages' object names minus the task names
(``models/negative_class.py``, strategy ``random``): a task-neutral list sampled uniformly. No package
here ships OpenImages' names; ``balanced`` keeps their point (a list chosen independently of the task)
where WordNet's own categories are the task.

Example:
    >>> names = expand_classes(["T-shirt/top", "Trouser"], total=1024, seed=0)
    >>> names[:2]
    ['T-shirt/top', 'Trouser']
    >>> old = expand_classes(["T-shirt/top", "Trouser"], total=1024, seed=0, draw="concrete")
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Sequence

from graytune.assets import wordnet_nouns
from graytune.errors import InvalidInputError

#: WordNet's noun lexicographer files (categories) by number, as ``lexnames(5WN)`` names them.
NOUN_CATEGORIES = {
    3: "Tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition", 10: "communication",
    11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location", 16: "motive", 17: "object", 18: "person",
    19: "phenomenon", 20: "plant", 21: "possession", 22: "process", 23: "quantity", 24: "relation", 25: "shape",
    26: "state", 27: "substance", 28: "time",
}
#: The categories ``balanced`` draws from: every noun category but ``noun.Tops`` (its words name the others).
BALANCED_CATEGORIES = tuple(n for n in NOUN_CATEGORIES if n != 3)
#: ``concrete``: the categories of concrete, visual things (animal, artifact, food, object, plant).
VISUAL_LEXFILES = (5, 6, 13, 17, 20)
#: The draws ``expand_classes`` knows, the default first.
DRAWS = ("balanced", "concrete")
DEFAULT_DRAW = DRAWS[0]


def visual_nouns() -> list[str]:
    """The first lemma of every WordNet noun synset naming a concrete, visual thing (sorted, unique)."""
    return sorted({lemmas[0] for lexfile, lemmas, _ in wordnet_nouns().values()
                   if lexfile in VISUAL_LEXFILES and lemmas[0][:1].islower()})  # common nouns, not genera


def category_nouns(left_out: Sequence[int] = ()) -> dict[int, list[str]]:
    """Per category of ``BALANCED_CATEGORIES`` not in ``left_out``: its common nouns (sorted), each noun in one.

    A noun is the first lemma of a synset (as ``visual_nouns``), placed in the category of the first synset,
    in WordNet's file order, that it heads. A noun that is any lemma of a synset in a ``left_out`` category
    is in none.
    """
    excluded: set[str] = set()
    for lexfile, lemmas, _ in wordnet_nouns().values():
        if lexfile in left_out:
            excluded.update(lemma.lower() for lemma in lemmas)
    home: dict[str, int] = {}
    for lexfile, lemmas, _ in wordnet_nouns().values():
        noun = lemmas[0]
        if lexfile in BALANCED_CATEGORIES and lexfile not in left_out and noun[:1].islower() \
                and noun.lower() not in excluded:
            home.setdefault(noun, lexfile)
    out: dict[int, list[str]] = {c: [] for c in BALANCED_CATEGORIES if c not in left_out}
    for noun, lexfile in home.items():
        out[lexfile].append(noun)
    return {c: sorted(nouns) for c, nouns in out.items()}


def named_categories(task: Sequence[str]) -> list[int]:
    """The WordNet noun categories a task class names (``animal`` -> 5, ``noun.animal`` too), in order."""
    by_name = {name.lower(): number for number, name in NOUN_CATEGORIES.items()}
    found = [by_name.get(t.lower().removeprefix("noun.").strip()) for t in task]
    return list(dict.fromkeys(c for c in found if c is not None))


def expand_classes(task: Sequence[str], total: int, seed: int = 0, vocabulary: Sequence[str] | None = None,
                   draw: str = DEFAULT_DRAW) -> list[str]:
    """``task`` plus ``total - len(task)`` auxiliary names drawn with ``seed`` (see the module docstring).

    Args:
        task: the task class names, kept first and in order.
        total: M, the length of the list.
        seed: the draw's seed.
        vocabulary: draw uniformly from these names instead (``draw`` is then not used).
        draw: ``balanced`` (the default) or ``concrete`` (graytune's earlier draw).

    Raises:
        InvalidInputError: an unknown ``draw``, or ``total`` outside what the task and vocabulary allow.
    """
    if draw not in DRAWS:
        close = difflib.get_close_matches(str(draw), DRAWS, n=1)
        raise InvalidInputError(f"auxiliary-class draw must be one of {', '.join(DRAWS)}; got {draw!r}"
                                + (f" (did you mean {close[0]!r}?)" if close else ""))
    taken = {t.lower() for t in task}
    extra = total - len(task)
    if vocabulary is None and draw == "balanced":
        return [*task, *_balanced(task, extra, taken, seed)]
    pool_source = visual_nouns() if vocabulary is None else vocabulary
    pool = sorted({v for v in pool_source if v.lower() not in taken})
    _check_size(task, total, len(pool))
    return [*task, *random.Random(seed).sample(pool, extra)]


def _balanced(task: Sequence[str], extra: int, taken: set[str], seed: int) -> list[str]:
    """``extra`` names, as many from each category left in as it can give, shuffled (``seed``)."""
    pools = {c: [n for n in nouns if n.lower() not in taken]
             for c, nouns in category_nouns(named_categories(task)).items()}
    _check_size(task, len(task) + extra, sum(len(p) for p in pools.values()))
    rng = random.Random(seed)
    quota, need = {}, extra
    smallest_first = sorted(pools, key=lambda c: (len(pools[c]), c))
    for i, c in enumerate(smallest_first):  # equal shares; a category with too few names gives all it has
        quota[c] = min(len(pools[c]), need // (len(smallest_first) - i))
        need -= quota[c]
    while need > 0:  # what the shares leave over: one more name each from the categories that gave least
        open_ = [c for c in pools if quota[c] < len(pools[c])]
        least = min(quota[c] for c in open_)
        fewest = [c for c in open_ if quota[c] == least]
        for c in rng.sample(fewest, min(need, len(fewest))):
            quota[c] += 1
            need -= 1
    names = [n for c in pools for n in rng.sample(pools[c], quota[c])]
    rng.shuffle(names)
    return names


def _check_size(task: Sequence[str], total: int, pool: int) -> None:
    if not len(task) <= total <= len(task) + pool:
        raise InvalidInputError(f"cannot make {total} classes from {len(task)} task classes and a vocabulary of "
                                f"{pool} other names; choose total between {len(task)} and {len(task) + pool}")
