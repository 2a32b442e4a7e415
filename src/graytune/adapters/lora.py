"""White-box baselines: LoRA through PEFT, and full fine-tuning, on the client's copy of the module.

These change the backbone module itself, so they need white-box access (a copy
from ``handle.module()``); they never run over the network. A LoRA artifact is a
PEFT artifact too: its config holds PEFT's ``LoraConfig`` fields and its tensors
PEFT's names, so ``peft.PeftModel.from_pretrained`` loads it on the same
transformers model.

Example:
    >>> module = apply_whitebox("lora", handle.module(), LoRAConfig(rank=4), handle.spec.id)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from graytune.adapters.declared import Declared
from graytune.errors import InvalidInputError
from graytune.registry import Registry
from graytune.types import AccessLevel

#: name -> white-box module adapter class (``lora``, ``full``)
WHITEBOX: Registry = Registry("white-box adapter")

# EfficientNet's convs are a custom "same"-padding class that PEFT cannot wrap (it rebuilds the
# class with other arguments), so on the image tower LoRA reaches its classifier layer only.
LORA_TARGETS = ("query", "value", "q_proj", "v_proj", "_fc")
#: a diffusion model's LoRA goes on its UNet's attention (diffusers' LoRA training scripts' targets): the text
#: encoder and the VAE stay frozen, and ``full`` trains the UNet alone
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LoRAConfig:
    rank: int = 8
    """Rank r of each low-rank update."""
    alpha: int = 16
    """Scale numerator: updates are multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    targets: tuple[str, ...] = field(default=LORA_TARGETS)
    """Names of the layers to adapt (the last part of a module path); those the module lacks are skipped."""


@dataclass
class FullConfig:
    """Full fine-tuning has no options: every weight of the copy trains."""


class WhiteboxAdapter(Declared):
    """A change of the client's copy of the module (no port): it needs white-box access.

    Registered as every adapter is: ``@WHITEBOX.register("full")`` over the class, which declares
    ``config_class`` and ``trains``.
    """

    min_access = AccessLevel.WHITE_BOX

    @staticmethod
    def apply(module: nn.Module, config: Any, backbone: str) -> nn.Module:
        """``module`` changed for training (in place or a new one)."""
        raise NotImplementedError

    @staticmethod
    def defaults_for(module: nn.Module, config: Any) -> Any:
        """``config`` with defaults that depend on the module filled in (the config is what artifacts record)."""
        return config


@WHITEBOX.register("lora")
class LoRA(WhiteboxAdapter):
    config_class = LoRAConfig
    trains = "low-rank updates of the attention (or classifier) weights"

    @staticmethod
    def apply(module: nn.Module, config: LoRAConfig, backbone: str) -> nn.Module:
        from peft import inject_adapter_in_model

        if config.rank < 1 or config.alpha <= 0 or not 0 <= config.dropout < 1:
            raise InvalidInputError(f"lora: got rank={config.rank}, alpha={config.alpha}, dropout={config.dropout}; "
                                    "need rank >= 1, alpha > 0 and 0 <= dropout < 1")
        target = trained_part(module)
        inject_adapter_in_model(peft_config(target, config, backbone), target)
        for name, param in module.named_parameters():
            param.requires_grad_("lora_" in name)
        return module

    @staticmethod
    def defaults_for(module: nn.Module, config: LoRAConfig) -> LoRAConfig:
        """``config`` with the default targets made the module's own: a diffusion model's UNet attention."""
        if config.targets == LORA_TARGETS and trained_part(module) is not module:
            return replace(config, targets=UNET_LORA_TARGETS)
        return config


@WHITEBOX.register("full")
class Full(WhiteboxAdapter):
    config_class = FullConfig
    trains = "every weight of the client's copy of the backbone"

    @staticmethod
    def apply(module: nn.Module, config: FullConfig, backbone: str) -> nn.Module:
        trained_part(module).requires_grad_(True)
        return module


def trained_part(module: nn.Module) -> nn.Module:
    """What a white-box baseline trains of ``module``: a diffusion model's UNet (its text encoder and VAE stay
    frozen, as diffusers' fine-tuning scripts keep them), any other module whole."""
    unet = getattr(module, "unet", None)
    return unet if isinstance(unet, nn.Module) else module


def peft_config(module: nn.Module, config: LoRAConfig, backbone: str) -> Any:
    """PEFT's ``LoraConfig`` for ``config`` on ``module`` (targets it lacks dropped; none left is an error)."""
    from peft import LoraConfig

    names = [name for name, _ in module.named_modules()]
    targets = [t for t in config.targets if any(n == t or n.endswith("." + t) for n in names)]  # PEFT's match
    if not targets:
        raise InvalidInputError(f"lora: none of the targets {list(config.targets)} names a layer of {backbone}; "
                                f"give --option targets=NAME,... with names such as "
                                f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in names} - {''})[:6])}")
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=sorted(targets),
                      lora_dropout=config.dropout)


def apply_whitebox(name: str, module: nn.Module, config: Any, backbone: str) -> nn.Module:
    """``module`` (a copy from ``handle.module()``) changed by the white-box adapter ``name``."""
    return WHITEBOX.lookup(name)[0].apply(module, config, backbone)


def whitebox_config(name: str, module: nn.Module, config: Any) -> Any:
    """``config`` as the white-box adapter ``name`` applies it to ``module`` (what its artifact records)."""
    return WHITEBOX.lookup(name)[0].defaults_for(module, config)
