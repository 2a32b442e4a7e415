"""The steps the language-model benchmark measures: a completion batch, and one training step per method.

- :func:`lm_batch`: ``B`` rows of random token ids, right-padded (real lengths spread over the last 6
  positions), the first two thirds of each row the prompt and the rest the completion, whose tokens are
  the targets (``-100`` elsewhere), as ``CompletionTask.collate`` lays them out. Time and memory do not
  depend on which tokens they are, and the ``arch:`` backbones have no tokenizer.
- :func:`boundary_loss` / :func:`plain_loss`: the completion NLL of a DGA adapter (a shift on every real
  token embedding and K tokens inserted before the first) through a dark-gray handle, and the same
  computation by plain autograd through the white-box module, the edits applied by hand as
  ``inputs_embeds``; only the positions with a target go through the LM head in both.
- :func:`method_step`: one training step of a registered method through ``AdaptedModel`` (AdamW on a
  backward pass; ``zero-shot`` a forward alone under ``no_grad``; ``prompt-zo`` MeZO's two forwards and
  AdamW on the estimate), or of :data:`NATIVE` (DGA's tensors by plain autograd).

Example:
    >>> step, info = method_step("arch:llama-tiny", "dga", batch=2, length=12)
    >>> step()
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from graytune.access import Handle, open_backbone
from graytune.adapters.base import zo_parameters
from graytune.errors import InvalidInputError
from graytune.methods import METHODS, get_method
from graytune.model import AdaptedModel
from graytune.recipes.run import open_for
from graytune.train.completions import IGNORE
from graytune.train.zeroth import ZerothOrder, ZOSettings

Tensor = torch.Tensor
Step = Callable[[], None]

LM_METHODS = tuple(name for name, m in METHODS.items() if "causal-lm" in m.backbones)
"""Every method the registry lends to language models, with its registry defaults."""
NATIVE = "native"
"""DGA's shift and extra token trained by plain autograd through the white-box module: the input-gradient floor."""
ZO_ESTIMATOR = "mezo"
"""The zeroth-order step measured (MeZO: two forwards per step, the estimator made for language models)."""
UNUSED = ("logit_scale",)
"""``AdaptedModel``'s CLIP temperature: a language model never uses it, so it is not counted as trained."""


def lm_batch(vocab: int, batch: int, length: int, seed: int = 0) -> dict[str, Tensor]:
    """``text.input_ids``, ``text.attention_mask`` and ``text.target_ids`` ``[B, L]`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    shortest = max(2, length - 6)
    lengths = torch.linspace(shortest, length, batch).round().long() if batch > 1 else torch.tensor([length])
    ids = torch.zeros(batch, length, dtype=torch.long)  # [B, L], padding id 0 (masked)
    mask = torch.zeros(batch, length, dtype=torch.long)
    targets = torch.full((batch, length), IGNORE, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        ids[b, :n] = torch.randint(0, vocab - 2, (n,), generator=g)  # the last two ids are often special
        mask[b, :n] = 1
        prompt = max(1, 2 * n // 3)
        targets[b, prompt - 1:n - 1] = ids[b, prompt:n]  # position t predicts token t + 1
    return {"text.input_ids": ids, "text.attention_mask": mask, "text.target_ids": targets}


def completion_nll(logprobs: Tensor, targets: Tensor) -> Tensor:
    """The mean negative log-likelihood of the completion tokens (``CompletionTask.loss``'s), from ``[B, L]``."""
    return -logprobs.sum() / (targets != IGNORE).sum().clamp(min=1)


def vocab_size(handle: Handle) -> int:
    return int(handle.spec.preprocess["text"]["vocab_size"])


def boundary_loss(model: AdaptedModel, batch: Mapping[str, Tensor]) -> Tensor:
    """The completion NLL of ``model`` through its handle (``text.target_logprobs``)."""
    return completion_nll(model.target_logprobs(batch), batch["text.target_ids"])


def plain_loss(lm: nn.Module, batch: Mapping[str, Tensor], shift: Tensor, extra: Tensor) -> Tensor:
    """The completion NLL of a DGA adapter by plain autograd through ``lm`` (a transformers causal LM).

    ``shift`` ``[1, 1, D]`` is added to every real token's embedding, ``extra`` ``[1, K, D]`` goes before the
    first token (the boundary's layout: positions 0..K-1, then the text's).
    """
    ids, mask, targets = batch["text.input_ids"], batch["text.attention_mask"], batch["text.target_ids"]
    embeds = lm.get_input_embeddings()(ids) + shift * mask.unsqueeze(-1).to(shift.dtype)  # [B, L, D]
    k = extra.shape[1]
    embeds = torch.cat([extra.expand(len(ids), -1, -1), embeds], dim=1)  # [B, K+L, D]
    full_mask = torch.cat([mask.new_ones(len(ids), k), mask], dim=1)  # [B, K+L]
    hidden = lm.get_decoder()(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state[:, k:]  # [B, L, D]
    rows, cols = ((targets != IGNORE) & (mask != 0)).nonzero(as_tuple=True)  # [N] each
    logits = lm.get_output_embeddings()(hidden[rows, cols]).float()  # [N, V]: only where a target is
    picked = logits.log_softmax(-1).gather(1, targets[rows, cols].unsqueeze(1))  # [N, 1]
    return -picked.sum() / (targets != IGNORE).sum().clamp(min=1)


def adamw_step(params: list[nn.Parameter], loss_of: Callable[[], Tensor], lr: float) -> Step:
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of().backward()
        optimizer.step()

    return step


def overhead_steps(backbone: str, batch: int, length: int) -> tuple[Step, Step, dict[str, Tensor]]:
    """The DGA step through the boundary and the same step by plain autograd (same initial tensors), and the batch."""
    model = AdaptedModel.build(open_backbone(backbone, "dark-gray"), "dga")
    (adapter,) = model.text_adapters
    tokens = lm_batch(vocab_size(model.handle), batch, length)
    lm = open_backbone(backbone, "white-box").module()  # a frozen copy
    shift, extra = (nn.Parameter(t.detach().clone()) for t in (adapter.shift, adapter.extra))
    lr = get_method("dga").lr or 1e-3
    return (adamw_step([adapter.shift, adapter.extra], lambda: boundary_loss(model, tokens), lr),
            adamw_step([shift, extra], lambda: plain_loss(lm, tokens, shift, extra), lr), tokens)


def method_step(backbone: str, method: str, batch: int, length: int) -> tuple[Step, dict[str, Any]]:
    """One training step of ``method`` on ``backbone`` and what it trains: ``trainable``, and for white-box
    steps the backbone's ``params`` and ``weights_mb`` (one fp32 copy of its state)."""
    if method == NATIVE:
        return _native_step(backbone, batch, length)
    if method not in LM_METHODS:
        raise InvalidInputError(f"method {method!r} does not train a language model; the LM benchmark measures "
                                f"{', '.join(LM_METHODS)} and {NATIVE}")
    handle = open_for(backbone, None, method)
    model = AdaptedModel.build(handle, method)
    tokens = lm_batch(vocab_size(handle), batch, length)
    del handle  # white-box methods run on the model's own copy; the owner's (for arch:, not cached) can go
    gc.collect()
    info: dict[str, Any] = {"trainable": _trainable(model)}
    if model.backbone_module is not None:
        info.update(_weights(model.backbone_module))
    if method == "zero-shot":
        def forward() -> None:
            with torch.no_grad():
                boundary_loss(model, tokens)

        return forward, info
    lr = get_method(method).lr or 1e-3
    if get_method(method).zeroth_order:
        return _zeroth_order_step(model, tokens, lr), info
    params = [p for n, p in model.named_parameters() if p.requires_grad and n not in UNUSED]
    return adamw_step(params, lambda: boundary_loss(model, tokens), lr), info


def _native_step(backbone: str, batch: int, length: int) -> tuple[Step, dict[str, Any]]:
    model = AdaptedModel.build(open_backbone(backbone, "dark-gray"), "dga")  # for its initial tensors
    (adapter,) = model.text_adapters
    tokens = lm_batch(vocab_size(model.handle), batch, length)
    lm = open_backbone(backbone, "white-box").module()
    shift, extra = (nn.Parameter(t.detach().clone()) for t in (adapter.shift, adapter.extra))
    del model, adapter
    info = {"trainable": shift.numel() + extra.numel(), **_weights(lm)}
    return adamw_step([shift, extra], lambda: plain_loss(lm, tokens, shift, extra), get_method("dga").lr or 1e-3), info


def _zeroth_order_step(model: AdaptedModel, tokens: Mapping[str, Tensor], lr: float) -> Step:
    """MeZO's step: the loss at θ ± εu (two forwards, no graph), the estimate stepped by AdamW."""
    zo = ZerothOrder(zo_parameters(model), ZOSettings.resolve(ZO_ESTIMATOR), seed=0)
    optimizer = torch.optim.AdamW(list(zo.variables().values()), lr=lr)
    count = [0]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        zo.accumulate(lambda: boundary_loss(model, tokens), step=count[0])
        zo.write_grads()
        optimizer.step()
        zo.after_step()
        count[0] += 1

    return step


def _trainable(model: AdaptedModel) -> int:
    zeroth = {id(p) for p in zo_parameters(model).values()}
    return sum(p.numel() for n, p in model.named_parameters()
               if (p.requires_grad or id(p) in zeroth) and n not in UNUSED)


def _weights(module: nn.Module) -> dict[str, Any]:
    """Parameters and the MB of one copy of them and the buffers (tied embeddings counted once)."""
    tensors = {t.data_ptr(): t for t in [*module.parameters(), *module.buffers()]}
    return {"params": sum(p.numel() for p in module.parameters()),
            "weights_mb": sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20}
