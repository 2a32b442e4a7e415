"""What the CLIP-scale table measures: its cells, the methods it accepts, the batch and the step of a cell.

A cell is one method's training step on one ``arch:`` backbone, batch, dtype and owner recomputation
setting; :func:`plan_cells` lists every cell of a table and :func:`build_step` makes the step a cell
times (``graytune.bench.clip_measure`` measures it, ``graytune.bench.clip_scale`` puts the table together).

Example:
    >>> cells = plan_cells(["clip-tiny"], [2], ["fp32"], ["dga"], [False, True], "cpu", steps=1, warmup=0)
    >>> step, trainable = build_step(cells[0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graytune.access import Handle, open_backbone
from graytune.errors import InvalidInputError
from graytune.methods import MethodKind, get_method, methods_shown_in
from graytune.model import AdaptedModel
from graytune.types import AccessLevel

Tensor = torch.Tensor

METHODS = tuple(methods_shown_in("bench"))
"""The methods measured by default; ``full`` always runs (the ratios' reference)."""
NATIVE = "native"
"""DGA's adapters by plain autograd through the white-box module: the input-gradient floor."""
NO_BACKBONE_GRADIENT = ("zero-shot", "output")
"""No gradient crosses the backbone, so owner recomputation changes nothing: measured with it off only."""
LORA_OPTIONS = {"rank": 16, "targets": "q_proj,v_proj"}
CONTEXT = 77  # CLIP's text positions


@dataclass(frozen=True)
class Cell:
    """One measurement: a method's step on one architecture, batch, dtype and recomputation setting."""

    arch: str
    method: str
    dtype: str
    recompute: bool
    batch: int
    device: str
    steps: int = 3
    warmup: int = 1


def clip_batch(handle: Handle, batch: int, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """``[B, 3, S, S]`` pixels and ``[B, 77]`` right-padded token ids with their mask, on the handle's device.

    Ids follow CLIP's vocabulary: start and end tokens are its last two ids (49406, 49407), padding is
    the end token, the real tokens between are drawn at random.
    """
    size = int(handle.spec.port("image.pixels").shape[-1])
    vocab = int(handle.spec.preprocess["text"]["vocab_size"])
    start, end = vocab - 2, vocab - 1
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, size, size, generator=g)  # [B, 3, S, S]
    lengths = torch.linspace(8, 60, batch).round().long() if batch > 1 else torch.tensor([34])  # real tokens
    ids = torch.full((batch, CONTEXT), end, dtype=torch.long)  # [B, 77]
    mask = torch.zeros(batch, CONTEXT, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        ids[row, 0] = start
        ids[row, 1:n - 1] = torch.randint(0, start, (n - 2,), generator=g)
        mask[row, :n] = 1
    where = handle.device
    return pixels.to(where), {"text.input_ids": ids.to(where), "text.attention_mask": mask.to(where)}


def build_step(cell: Cell) -> tuple[Callable[[], None], int]:
    """The step ``cell`` measures (a closure over its model, batch and optimizer) and its trainable count."""
    name = "dga" if cell.method == NATIVE else cell.method
    method = get_method(name)
    white = cell.method == NATIVE or method.kind is MethodKind.WHITEBOX
    handle = open_backbone(f"arch:{cell.arch}", AccessLevel.WHITE_BOX if white else method.min_access,
                           reads=method.reads, device=cell.device, dtype=cell.dtype,
                           recompute=cell.recompute and cell.method != NATIVE)
    model = AdaptedModel.build(handle, name, LORA_OPTIONS if name == "lora" else None)
    pixels, tokens = clip_batch(handle, cell.batch)
    del handle  # white-box methods run on the model's own copy; the owner's placed copy can go
    labels = torch.arange(cell.batch, device=model.device)

    def loss() -> Tensor:
        out = model(images=pixels, texts=tokens)
        return (F.cross_entropy(out.logits_per_image, labels) + F.cross_entropy(out.logits_per_text, labels)) / 2

    if cell.method == "zero-shot":
        def forward() -> None:
            with torch.no_grad():
                loss()

        return forward, 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=method.lr or 1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return step, sum(p.numel() for p in params)


def plan_cells(archs: Sequence[str], batches: Sequence[int], dtypes: Sequence[str], methods: Sequence[str],
               recompute: Sequence[bool], device: str, steps: int, warmup: int) -> list[Cell]:
    """Every cell to measure.

    ``full`` and ``native`` always run without recomputation (the ratios' references); ``full`` with it
    too only when asked for among ``methods``. Recomputation only where a gradient crosses the backbone.
    """
    wanted = list(dict.fromkeys([*methods, "full", NATIVE]))
    cells = []
    for arch in archs:
        for batch in batches:
            for dtype in dtypes:
                for method in wanted:
                    settings = [False] if method in (*NO_BACKBONE_GRADIENT, NATIVE) else recompute
                    if method == "full":  # the reference, off always; on as well when asked for
                        settings = [False, *([True] if True in recompute and "full" in methods else [])]
                    cells += [Cell(arch, method, dtype, on, batch, device, steps, warmup) for on in settings]
    return cells


def check_methods(methods: Sequence[str]) -> None:
    """``InvalidInputError`` for a method whose training is not one AdamW step on a backward pass."""
    for name in methods:
        if name == NATIVE:
            continue
        method = get_method(name)
        why = ("adapts logits without a gradient through the backbone" if method.kind is MethodKind.LOGIT else
               "trains from forward calls alone (zeroth-order)" if getattr(method, "zeroth_order", False) else "")
        if why:
            raise InvalidInputError(f"method {name!r} {why}, not by one AdamW step on a backward pass; the "
                                    f"CLIP-scale table measures {', '.join(METHODS)} and others trained that way")

