"""Pixels decoded on the fly: nothing whole-set in memory beyond a bounded cache.

A ``PixelStream`` turns any image source (file paths, tar members, in-memory arrays,
video files) into preprocessed ``[B, 3, S, S]`` batches (``[B, F, 3, S, S]`` for
videos) for the index lists it is given, decoding in DataLoader workers when asked.
A file that cannot be decoded is reported with its name and where it came from (the
row of the CSV, the member of the shard).

Example:
    >>> stream = PixelStream.of(data.images, preprocess, LoaderConfig(workers=2, cache_mb=64))
    >>> for pixels in stream.batches([[0, 5, 9], [3, 1, 2]]):   # [3, 3, S, S] each
    ...     ...
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from graytune.data.images import VIDEO_SUFFIXES, ImagePreprocess
from graytune.errors import InvalidInputError

Tensor = torch.Tensor


@dataclass(frozen=True)
class LoaderConfig:
    """How images are read while training and evaluating."""

    workers: int = 0
    """DataLoader worker processes decoding images (0: in this process)."""
    cache_mb: float = 64.0
    """Preprocessed pixels kept in memory between epochs, at most this many MB (0: none)."""


class _Decode(torch.utils.data.Dataset):
    """Item ``i``: the preprocessed pixels of source ``i`` (a picklable dataset, for DataLoader workers)."""

    def __init__(self, load: Callable[[int], Any], n: int, preprocess: ImagePreprocess,
                 where: Callable[[int], str], frames: int) -> None:
        self.load, self.n, self.preprocess, self.where, self.frames = load, n, preprocess, where, frames

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        try:
            item = self.load(i)
            if isinstance(item, str | Path) and Path(item).suffix.lower() in VIDEO_SUFFIXES:
                from graytune.data.video import sample_frames

                return self.preprocess(sample_frames(item, self.frames))  # [F, 3, S, S]
            if not isinstance(item, Image.Image):
                source = io.BytesIO(item.read_bytes()) if not isinstance(item, str | Path) else item
                with Image.open(source) as image:
                    image.load()
                    item = image.copy()
            return self.preprocess([item])[0]  # [3, S, S]
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise InvalidInputError(f"cannot read image {self.where(i)}: {err}; fix or remove it "
                                    "from the data set") from None


def _stack(items: list[Tensor]) -> Tensor:
    return torch.stack(items)


class PixelStream:
    """Preprocessed pixels of ``n`` images, loaded per batch of indices (see the module docstring)."""

    def __init__(self, load: Callable[[int], Any], n: int, preprocess: ImagePreprocess,
                 loader: LoaderConfig | None = None, where: Callable[[int], str] | None = None,
                 frames: int = 8) -> None:
        self.preprocess, self.loader = preprocess, loader or LoaderConfig()
        self._data = _Decode(load, n, preprocess, where or _by_number, frames)
        self._cache: OrderedDict[int, Tensor] = OrderedDict()
        self._cache_bytes = 0

    @classmethod
    def of(cls, items: Sequence[Any], preprocess: ImagePreprocess, loader: LoaderConfig | None = None,
           where: Callable[[int], str] | None = None) -> PixelStream:
        """A stream over a sequence of paths or PIL images."""
        return cls(_Item(items), len(items), preprocess, loader, where or _PathWhere(items))

    def __len__(self) -> int:
        return len(self._data)

    def batch(self, indices: Sequence[int]) -> Tensor:
        """``[len(indices), 3, S, S]`` pixels (in this process)."""
        return next(self.batches([list(indices)], workers=0))

    def batches(self, groups: Sequence[Sequence[int]] | Iterator[Sequence[int]], workers: int | None = None,
                keep: bool = True) -> Iterator[Tensor]:
        """One pixel batch per index list, in order; decoded in ``loader.workers`` processes.

        With ``keep``, decoded images enter the bounded cache (training revisits them every epoch).
        """
        workers = self.loader.workers if workers is None else workers
        if workers == 0:
            for group in groups:
                yield torch.stack([self._get(i, keep) for i in group])
            return
        loader = torch.utils.data.DataLoader(self._data, batch_sampler=[list(g) for g in groups],
                                             num_workers=workers, collate_fn=_stack, persistent_workers=False)
        yield from loader

    def sequential(self, batch_size: int) -> Iterator[Tensor]:
        """Every image in order, ``batch_size`` at a time (evaluation: one pass, nothing kept)."""
        n = len(self)
        yield from self.batches([list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)],
                                keep=False)

    def _get(self, i: int, keep: bool = True) -> Tensor:
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        pixels = self._data[i]
        if not keep:
            return pixels
        budget = self.loader.cache_mb * 1e6
        size = pixels.numel() * pixels.element_size()
        if size <= budget:
            self._cache[i] = pixels
            self._cache_bytes += size
            while self._cache_bytes > budget:  # least recently used out
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.numel() * old.element_size()
        return pixels


class _Item:
    """``items[i]`` as a picklable callable."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __call__(self, i: int) -> Any:
        return self.items[i]


class _PathWhere:
    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __call__(self, i: int) -> str:
        item = self.items[i]
        return str(item) if not isinstance(item, Image.Image) else f"number {i}"


def _by_number(i: int) -> str:
    """Where image ``i`` came from, for sources that know no file (in-memory arrays)."""
    return f"number {i}"
