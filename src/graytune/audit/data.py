"""What an audit's attacker sends and what its probes are scored on.

Three disjoint sets per modality: an unlabelled **pool** the attacker queries (public data of the
same kind: the attacker has no labels), and the labelled **probe train** and **probe test** sets
on which linear probes over the backbone's and the surrogate's features are compared. The held-out
agreement and cosine are measured on the probe test set, which the attacker never sends.

- text: ``wordnet-supersense`` (noun glosses in 10 supersenses); the pool is every other WordNet noun gloss.
- image: ``fashion-mnist`` (10 classes); the pool is the training images the probe does not use.

Example:
    >>> data = load_audit_data("text", "wordnet-supersense", probe_train=2000, probe_test=1000, seed=0)
    >>> stream = QueryStream(data.pool, seed=0)
    >>> stream.next(32)          # 32 texts the attacker has not sent before
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from graytune.data.images import ImagePreprocess
from graytune.errors import InvalidInputError
from graytune.types import BackboneSpec

Tensor = torch.Tensor
Items = Any  # list[str] (text) or a tensor of images: [N, H, W] uint8 grey, [N, 3, H, W] uint8 or float pixels


@dataclass
class AuditData:
    """The attacker's pool and the probe sets of one modality.

    Attributes:
        modality: ``text`` or ``image``.
        name: the labelled set's name.
        pool: unlabelled items the attacker queries.
        train_items, train_labels: the probe's training set (``[N]`` int64 labels).
        test_items, test_labels: the held-out set.
        class_names: names of the labels.
    """

    modality: str
    name: str
    pool: Items
    train_items: Items
    train_labels: Tensor
    test_items: Items
    test_labels: Tensor
    class_names: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "modality": self.modality, "pool": len(self.pool),
                "probe_train": len(self.train_labels), "probe_test": len(self.test_labels),
                "classes": len(self.class_names)}


def load_audit_data(modality: str, name: str, probe_train: int, probe_test: int, seed: int) -> AuditData:
    """The default sets: ``wordnet-supersense`` for text, ``fashion-mnist`` for images."""
    known = {"text": "wordnet-supersense", "image": "fashion-mnist"}
    if name != known[modality]:
        other = next((m for m, n in known.items() if n == name), None)
        why = f"it is a {other} set and this audit attacks the {modality} tower" if other else "it is not supported"
        raise InvalidInputError(f"--data {name!r} cannot probe the {modality} tower ({why}); the audit probes "
                                f"{modality} with {known[modality]!r}: leave --data out or pass --modality "
                                f"{other or modality}")
    return _wordnet(probe_train, probe_test, seed) if modality == "text" else _fashion(probe_train, probe_test, seed)


def _wordnet(probe_train: int, probe_test: int, seed: int) -> AuditData:
    from graytune.assets import wordnet_nouns
    from graytune.data.catalog import load_splits

    splits = load_splits("wordnet-supersense", seed=seed)
    train, test = splits.train, splits.test
    if probe_train > len(train) or probe_test > len(test):
        raise InvalidInputError(f"wordnet-supersense has {len(train)} probe-training and {len(test)} held-out "
                                f"glosses; asked {probe_train} and {probe_test}: lower --probe-train/--probe-test")
    labelled = set(train.texts) | set(splits.val.texts) | set(test.texts)
    pool = sorted({gloss for _, _, gloss in wordnet_nouns().values() if gloss and gloss not in labelled})
    random.Random(seed).shuffle(pool)
    return AuditData("text", "wordnet-supersense", pool, list(train.texts[:probe_train]), train.labels[:probe_train],
                     list(test.texts[:probe_test]), test.labels[:probe_test], train.class_names)


def _fashion(probe_train: int, probe_test: int, seed: int) -> AuditData:
    from graytune.data.labeled import load_fashion_mnist

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    held = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:probe_test]
    probe, pool = order[:probe_train], order[probe_train:]
    return AuditData("image", "fashion-mnist", train.images[pool], train.images[probe], train.labels[probe],
                     test.images[held], test.labels[held], train.class_names)


class Pixels:
    """Images as the backbone's ``image.pixels`` want them: RGB, ``size`` square, normalised by the spec."""

    def __init__(self, spec: BackboneSpec, size: int) -> None:
        fixed = spec.port("image.pixels").shape[-1]
        self.size = fixed if isinstance(fixed, int) else size
        self.preprocess = ImagePreprocess.from_spec(spec, self.size)

    def __call__(self, images: Tensor) -> Tensor:
        """``[B, 3, S, S]`` float32 from ``[B, H, W]``/``[B, 3, H, W]`` uint8 (dark on light, as
        ``LabeledImages.pil`` shows them) or ``[B, 3, S, S]`` float pixels, which pass unchanged."""
        if images.is_floating_point():
            if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != self.size:
                raise InvalidInputError(f"float images must be [B, 3, {self.size}, {self.size}] pixels; got "
                                        f"{list(images.shape)}")
            return images.float()
        grey = images.dim() == 3
        x = (255 - images.float()) / 255.0 if grey else images.float() / 255.0
        x = x.unsqueeze(1).expand(-1, 3, -1, -1) if grey else x  # [B, 3, H, W]
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        return self.preprocess.normalize(x)


class QueryStream:
    """Items the attacker sends, in a seeded order: the pool once, then new items made from it.

    After the pool is used up, each new text joins the first half of one pool text to the second
    half of another, and each new image mixes two pool images; so a large budget never resends
    an item it has sent.
    """

    def __init__(self, pool: Items, seed: int) -> None:
        if len(pool) < 2:
            raise InvalidInputError(f"the attacker's pool holds {len(pool)} items; it needs at least 2")
        self.pool, self.rng = pool, random.Random(seed)
        self.order = list(range(len(pool)))
        self.rng.shuffle(self.order)
        self.at = 0

    def next(self, rows: int) -> Items:
        """``rows`` items: texts (a list) or images (a tensor)."""
        fresh = self.order[self.at:self.at + rows]
        self.at += len(fresh)
        made = rows - len(fresh)
        if isinstance(self.pool, list):
            return [self.pool[i] for i in fresh] + [self._text() for _ in range(made)]
        chosen = [self.pool[fresh]] if fresh else []
        if made:
            chosen.append(self._images(made))
        return torch.cat(chosen)

    def _text(self) -> str:
        a, b = (self.pool[self.rng.randrange(len(self.pool))].split() for _ in range(2))
        return " ".join(a[:max(1, len(a) // 2)] + b[len(b) // 2:])

    def _images(self, count: int) -> Tensor:
        a = torch.tensor([self.rng.randrange(len(self.pool)) for _ in range(count)])
        b = torch.tensor([self.rng.randrange(len(self.pool)) for _ in range(count)])
        mix = torch.tensor([self.rng.uniform(0.3, 0.7) for _ in range(count)])
        mix = mix.view(-1, *[1] * (self.pool.dim() - 1))
        x = mix * self.pool[a].float() + (1 - mix) * self.pool[b].float()
        return x.round().to(self.pool.dtype) if not self.pool.is_floating_point() else x

