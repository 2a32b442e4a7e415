"""A training step through the boundary changes only adapter tensors (DESIGN.md §1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import graytune
from graytune.backbones import load_backbone


class TrivialAdapter(nn.Module):
    """An identity-initialised pixel conv and a token shift around a dual-encoder handle."""

    def __init__(self, handle, dim: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.handle = handle  # not a Module: adds no parameters
        self.pixel = nn.Conv2d(3, 3, 3, padding=1)
        nn.init.dirac_(self.pixel.weight)
        nn.init.zeros_(self.pixel.bias)
        self.shift = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, pixels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.handle.forward({"image.pixels": self.pixel(pixels), "text": texts},
                                  add={"text.token_embeds": self.shift})
        return F.normalize(out["image.embeds"], dim=-1), F.normalize(out["text.embeds"], dim=-1)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_steps_change_only_adapter_tensors() -> None:
    bid = "bridge:efficientnet-lite0+minilm"
    owner_module = load_backbone(bid).module()  # test-side introspection: the owner's real weights
    before = snapshot(owner_module)
    handle = graytune.open_backbone(bid, access="dark-gray")
    model = TrivialAdapter(handle, 384)
    names = {n for n, _ in model.named_parameters()}
    assert names == {"pixel.weight", "pixel.bias", "shift"}
    assert set(model.state_dict()) == names
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    adapter_before = snapshot(model)
    torch.manual_seed(0)
    pixels, texts = torch.randn(4, 3, 64, 64), ["a dog", "a red car", "a tree", "a cup of coffee"]
    for _ in range(2):
        img, txt = model(pixels, texts)
        loss = F.cross_entropy(img @ txt.T / 0.05, torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    held |= {id(t) for state in opt.state.values() for t in state.values() if torch.is_tensor(t)}
    backbone_ids = {id(t) for t in owner_module.state_dict().values()}
    assert not held & backbone_ids
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == sum(p.numel() for p in model.parameters())
    after = snapshot(owner_module)
    assert all(torch.equal(before[k], after[k]) for k in before), "backbone weights changed"
    changed = [k for k, v in snapshot(model).items() if not torch.equal(v, adapter_before[k])]
    assert sorted(changed) == sorted(names)
    assert handle.exposure.gradient_queries == 2 and handle.exposure.forward_samples == 8
    assert handle.exposure.gradient_samples == 8  # each VJP revealed its call's 4 rows
