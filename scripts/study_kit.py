"""What the study scripts share: the converged study's tasks and its learning-rate ladder, read by both its
runner (scripts/converged.py) and its renderer (scripts/converged_table.py); a split's first items.

Kept apart so that no script imports another in a circle: the runner imports the renderer (``--smoke``
renders what it ran), and both import this module, which imports no script.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BRIDGE = "bridge:efficientnet-lite0+minilm"
GRAY = ["zero-shot", "output", "output-mlp", "dga", "dga-id", "lga", "adalink"]
WHITE = ["lora", "full"]
B2N = ["zero-shot", "output", "dga", "dga-id", "lga", "adalink"]


@dataclass(frozen=True)
class TaskDef:
    """One task of the study: ``results`` names its equal-small-budget setting in docs/results-raw.json."""

    backbone: str
    data: str
    image_size: int | None
    methods: tuple[str, ...]
    results: str | None = None


TASKS: dict[str, TaskDef] = {
    "text": TaskDef("minilm", "wordnet-supersense", None, (*GRAY, "adalink+output", *WHITE), "text"),
    "image": TaskDef(BRIDGE, "fashion-mnist", 64, (*GRAY, "adalink+output", *WHITE), "image"),
    "image-text": TaskDef(BRIDGE, "tuxpaint", 128, (*GRAY, "adalink+output", *WHITE), "image-text"),
    # one image tower: adalink has no input tokens to adapt there, and dga-id's gate is on text tokens only
    "sketch": TaskDef(BRIDGE, "tuxpaint-sketch", 96, ("zero-shot", "output", "output-mlp", "dga", "lga", *WHITE),
                      "sketch"),
    "text-b2n": TaskDef("minilm", "wordnet-supersense:base-to-novel", None, tuple(B2N)),
    "image-b2n": TaskDef(BRIDGE, "fashion-mnist:base-to-novel", 64, tuple(B2N)),
}


# --- the logic worth a test: the grid, the pick, the plateau -------------------------------------------------

def ladder_rate(k: int) -> float:
    """The k-th rate of the 1-3-10 ladder: even k is 10^(k/2), odd k three times 10^((k-1)/2)."""
    return float(f"{(1 if k % 2 == 0 else 3) * 10.0 ** (k // 2):.0e}")


def _nearest(lr: float) -> int:
    """The ladder position nearest ``lr`` on a log scale."""
    k = round(2 * math.log10(lr))
    return min((k - 1, k, k + 1), key=lambda j: abs(math.log(ladder_rate(j) / lr)))


def lr_grid(registry: float, each_side: int = 1) -> list[float]:
    """The registry's rate rounded onto the 1-3-10 ladder, with ``each_side`` neighbours below and above.

    >>> lr_grid(1e-3), lr_grid(3e-5)
    ([0.0003, 0.001, 0.003], [1e-05, 3e-05, 0.0001])
    """
    k = _nearest(registry)
    return [ladder_rate(j) for j in range(k - each_side, k + each_side + 1)]


def pick_lr(best_val: dict[float, float], registry: float) -> tuple[float, str]:
    """The rate with the best validation score, and ``"low"``/``"high"`` when it is the lowest/highest run
    ("" inside the grid). Ties (within 1e-9) go to the rate nearer the registry's, then to the lower."""
    top = max(best_val.values())
    tied = [lr for lr, v in best_val.items() if v >= top - 1e-9]
    chosen = min(tied, key=lambda lr: (abs(math.log(lr / registry)), lr))
    rates = sorted(best_val)
    edge = "low" if chosen == rates[0] and len(rates) > 1 else "high" if chosen == rates[-1] and len(rates) > 1 else ""
    return chosen, edge


def next_rate(best_val: dict[float, float], edge: str) -> float:
    """The ladder rate one beyond the edge the pick sits at."""
    end = min(best_val) if edge == "low" else max(best_val)
    return ladder_rate(_nearest(end) + (-1 if edge == "low" else 1))


def plateau(curve: list[tuple[int, float]], tol: float = 0.01) -> dict[str, Any]:
    """Where a validation curve ``[(step, value), ...]`` levels off.

    ``step``: the first validation within ``tol`` of the curve's best; ``rising``: whether the last quarter of
    the steps still beat everything before it by more than ``tol`` (then the budget did not reach a plateau).

    >>> plateau([(10, .5), (20, .7), (30, .705), (40, .70)])
    {'step': 20, 'best': 0.705, 'rising': False}
    """
    if not curve:
        return {"step": 0, "best": math.nan, "rising": False}
    best = max(v for _, v in curve)
    first = next(s for s, v in curve if v >= best - tol)
    last_step = curve[-1][0]
    cut = last_step - last_step / 4
    before = [v for s, v in curve if s <= cut]
    after = [v for s, v in curve if s > cut]
    rising = bool(before and after and max(after) > max(before) + tol)
    return {"step": first, "best": best, "rising": rising}


def first_items(data: Any, n: int | None) -> Any:
    """The first ``n`` items of a split (already shuffled by the catalog); all of it when ``n`` is None."""
    return data if n is None else data.subset(range(min(n, len(data))))
