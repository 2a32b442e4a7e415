"""TransMiter end to end: class scores, unsupervised extraction, forward-only transfer, TransMiter+.

Everything here needs only black-box access: image and text embeddings of the
weak and strong backbones (no gradient ever crosses a boundary), plus the
fine-tuned weak model's scores.

Example:
    >>> tm = TransMiter.create(task_classes, total=1024, prompt="a picture of a {}")
    >>> tm.extract(tm.scores(weak, unlabeled), teacher_scores)           # teacher: [N, N_task]
    >>> strong_tm = tm.transfer(tm.scores(weak, unlabeled), tm.scores(strong, unlabeled))
    >>> strong_tm.predict(strong, test_pixels)                            # [B, N_task]
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from graytune.adapters.transmiter import TransMiterAdapter, TransMiterConfig
from graytune.artifacts import CONFIG_NAME, WEIGHTS_NAME, write_atomically
from graytune.errors import ArtifactError, InvalidInputError
from graytune.schedules import warmup_cosine
from graytune.transfer.classes import expand_classes
from graytune.transfer.procrustes import orthogonal_procrustes

Tensor = torch.Tensor


class Encoder(Protocol):
    def encode_image(self, pixels: Tensor) -> Tensor: ...

    def encode_text(self, text: Sequence[str]) -> Tensor: ...


@dataclass
class ExtractConfig:
    """Extraction defaults from the authors' released code."""

    lr: float = 1e-3
    weight_decay: float = 1e-3
    batch_size: int = 128
    epochs: int = 10
    warmup: float = 0.05
    noise_p: float = 0.5
    """Probability, per sample, of adding logit noise."""
    noise_scale: float = 0.5
    """Noise std as a fraction of the sample's score std."""
    teacher_temperature: float = 0.5
    seed: int = 0


@dataclass
class PlusConfig:
    """TransMiter+ (a few labels): cross-entropy fine-tuning, selected on validation accuracy."""

    lr: float = 1e-4
    weight_decay: float = 1e-3
    batch_size: int = 128
    epochs: int = 20
    warmup: float = 0.1
    seed: int = 0


@torch.no_grad()
def class_text(encoder: Encoder, names: Sequence[str], prompt: str) -> Tensor:
    """``[C, E]`` normalised embeddings of the class prompts (compute once, reuse for every image batch)."""
    return F.normalize(torch.cat([encoder.encode_text([prompt.format(c) for c in names[i:i + 256]])
                                  for i in range(0, len(names), 256)]), dim=-1)


@torch.no_grad()
def class_scores(encoder: Encoder, pixels: Tensor, names: Sequence[str], prompt: str, batch_size: int = 128,
                 text: Tensor | None = None) -> Tensor:
    """``[N, C]`` scores, 100 × cosine of image embeddings and class-prompt embeddings (forward only)."""
    text = class_text(encoder, names, prompt) if text is None else text
    chunks = [F.normalize(encoder.encode_image(pixels[i:i + batch_size]), dim=-1) @ text.T
              for i in range(0, len(pixels), batch_size)]
    return 100.0 * torch.cat(chunks)


class TransMiter:
    """A logit adapter, the class list it scores (task classes first) and the prompt that names them."""

    def __init__(self, adapter: TransMiterAdapter, classes: Sequence[str], n_task: int, prompt: str) -> None:
        if len(classes) != adapter.config.classes or not 0 < n_task <= len(classes):
            raise InvalidInputError(f"transmiter: {len(classes)} class names for an adapter over "
                                    f"{adapter.config.classes} classes with {n_task} task classes")
        self.adapter, self.classes, self.n_task, self.prompt = adapter, list(classes), n_task, prompt
        self._text: dict[int, tuple[Encoder, Tensor]] = {}  # class-prompt embeddings per (frozen) encoder

    @classmethod
    def create(cls, task_classes: Sequence[str], total: int = 1024, dim: int | None = None, seed: int = 0,
               prompt: str = "a picture of a {}") -> TransMiter:
        """A fresh (identity) adapter over ``task_classes`` + seeded auxiliary names."""
        torch.manual_seed(seed)
        classes = expand_classes(task_classes, total, seed)
        adapter = TransMiterAdapter(TransMiterConfig(classes=total, dim=dim or total))
        return cls(adapter, classes, len(task_classes), prompt)

    # -- scores ----------------------------------------------------------------------------

    def scores(self, encoder: Encoder, pixels: Tensor) -> Tensor:
        """``[N, M]`` zero-shot scores over this class list (forward only).

        The M prompt embeddings are computed once per encoder and reused: encoders here are frozen
        (backbone handles, or a fine-tuned teacher that no longer trains).
        """
        cached = self._text.get(id(encoder))
        if cached is None or cached[0] is not encoder:
            cached = (encoder, class_text(encoder, self.classes, self.prompt))
            self._text[id(encoder)] = cached
        return class_scores(encoder, pixels, self.classes, self.prompt, text=cached[1])

    @torch.no_grad()
    def predict(self, encoder: Encoder, pixels: Tensor) -> Tensor:
        """``[N, N_task]`` adapted task-class scores."""
        return self.adapt(self.scores(encoder, pixels))

    def adapt(self, scores: Tensor) -> Tensor:
        """Adapter on ``[N, M]`` scores, task classes kept: ``[N, N_task]``."""
        return self.adapter(scores)[:, :self.n_task]

    # -- the three phases ------------------------------------------------------------------------

    def extract(self, weak_scores: Tensor, teacher_task_scores: Tensor, config: ExtractConfig | None = None,
                ) -> list[float]:
        """Distil the fine-tuned weak model (teacher, ``[N, N_task]``) into adapter(weak zero-shot scores).

        No labels: the loss is KL between the teacher's task-class distribution
        (temperature 0.5) and the adapted weak scores'. Returns the loss per epoch.
        """
        config = config or ExtractConfig()
        if teacher_task_scores.shape != (len(weak_scores), self.n_task):
            raise InvalidInputError(f"teacher scores must be [{len(weak_scores)}, {self.n_task}] (task classes of "
                                    f"the same images); got {list(teacher_task_scores.shape)}")
        gen = torch.Generator().manual_seed(config.seed)
        teacher = F.softmax(teacher_task_scores / config.teacher_temperature, dim=-1)

        def loss_fn(idx: Tensor) -> Tensor:
            z = weak_scores[idx]
            noisy = torch.rand(len(z), 1, generator=gen) < config.noise_p
            noise = torch.randn(z.shape, generator=gen) * config.noise_scale * z.std(dim=-1, keepdim=True)
            student = F.log_softmax(self.adapt(z + noise * noisy), dim=-1)
            return F.kl_div(student, teacher[idx], reduction="batchmean")

        return self._optimise(loss_fn, len(weak_scores), config.lr, config.weight_decay, config.batch_size,
                              config.epochs, config.warmup, gen)

    @torch.no_grad()
    def transfer(self, weak_scores: Tensor, strong_scores: Tensor, beta: float = 500.0) -> TransMiter:
        """The adapter moved to the strong backbone by an orthogonal basis change; no backprop anywhere.

        ``weak_scores`` and ``strong_scores`` are both backbones' zero-shot scores
        of the same unlabeled images over this class list.
        """
        if weak_scores.shape != strong_scores.shape or weak_scores.shape[1] != len(self.classes):
            raise InvalidInputError(f"transfer needs both backbones' scores of the same images over the "
                                    f"{len(self.classes)} saved classes; got {list(weak_scores.shape)} and "
                                    f"{list(strong_scores.shape)}")
        w_s = self.adapter.eval().weight  # [D, M]
        h_s = self.adapter.standardise(weak_scores)[0] @ w_s.T  # [N, D]
        h_t = self.adapter.standardise(strong_scores)[0] @ w_s.T
        rotation = orthogonal_procrustes(h_t, h_s, beta)  # argmin ‖H_t R − H_s‖ + β‖R − I‖
        moved = copy.deepcopy(self.adapter)
        moved.set_weight(rotation.T @ w_s)  # new in-projection W_sᵀ R, out-projection Rᵀ W_s
        result = TransMiter(moved.eval(), self.classes, self.n_task, self.prompt)
        result._text = dict(self._text)
        return result

    def finetune(self, scores: Tensor, labels: Tensor, val_scores: Tensor, val_labels: Tensor,
                 config: PlusConfig | None = None) -> dict[str, float]:
        """TransMiter+: cross-entropy on a few labels; keeps the epoch best on validation accuracy."""
        config = config or PlusConfig()
        gen = torch.Generator().manual_seed(config.seed)
        best = {"val_accuracy": self.accuracy(val_scores, val_labels), "epoch": 0.0}
        best_state = copy.deepcopy(self.adapter.state_dict())

        def on_epoch(epoch: int) -> None:
            nonlocal best_state
            acc = self.accuracy(val_scores, val_labels)
            if acc > best["val_accuracy"]:
                best.update(val_accuracy=acc, epoch=float(epoch))
                best_state = copy.deepcopy(self.adapter.state_dict())

        self._optimise(lambda idx: F.cross_entropy(self.adapt(scores[idx]), labels[idx]), len(scores), config.lr,
                       config.weight_decay, config.batch_size, config.epochs, config.warmup, gen, on_epoch)
        self.adapter.load_state_dict(best_state)
        self.adapter.eval()
        return best

    @torch.no_grad()
    def accuracy(self, scores: Tensor, labels: Tensor) -> float:
        self.adapter.eval()
        return 100.0 * float((self.adapt(scores).argmax(-1) == labels).float().mean())

    def _optimise(self, loss_fn: Any, n: int, lr: float, weight_decay: float, batch_size: int, epochs: int,
                  warmup: float, gen: torch.Generator, on_epoch: Any = None) -> list[float]:
        self.adapter.train()
        opt = torch.optim.AdamW(self.adapter.parameters(), lr=lr, weight_decay=weight_decay)
        per_epoch = max(1, math.ceil(n / batch_size))
        total = per_epoch * epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))
        history = []
        for epoch in range(1, epochs + 1):
            order, running = torch.randperm(n, generator=gen), 0.0
            for start in range(0, n, batch_size):
                loss = loss_fn(order[start:start + batch_size])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += float(loss.detach())
            history.append(running / per_epoch)
            if on_epoch is not None:
                on_epoch(epoch)
                self.adapter.train()
        self.adapter.eval()
        return history


def save_transmiter(tm: TransMiter, folder: str | os.PathLike[str], backbone: str, fingerprint: str,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter and its class list (PEFT layout), atomically."""
    import graytune

    config = {"library": "graytune", "library_version": graytune.__version__, "format_version": 1,
              "method": "transmiter", "access": "black-box", "backbone": backbone, "fingerprint": fingerprint,
              "adapter": asdict(tm.adapter.config), "classes": tm.classes, "n_task": tm.n_task, "prompt": tm.prompt,
              **(extra or {})}
    state = {k: v.detach().contiguous().clone() for k, v in tm.adapter.state_dict().items()}
    return write_atomically(Path(folder), {WEIGHTS_NAME: lambda p: save_file(state, str(p)),
                                           CONFIG_NAME: lambda p: p.write_text(json.dumps(config, indent=2))})


def load_transmiter(folder: str | os.PathLike[str], classes: Sequence[str] | None = None) -> tuple[TransMiter, dict]:
    """The saved TransMiter and its config; ``classes``, when given, must be the saved list in order."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file() or not (Path(folder) / WEIGHTS_NAME).is_file():
        raise ArtifactError(f"{folder} is not a saved TransMiter adapter ({CONFIG_NAME} and {WEIGHTS_NAME} needed)")
    config = json.loads(path.read_text())
    if config.get("method") != "transmiter":
        raise ArtifactError(f"{folder} holds a {config.get('method')!r} adapter, not a TransMiter one")
    if classes is not None and list(classes) != config["classes"]:
        diff = next((i for i, (a, b) in enumerate(zip(classes, config["classes"])) if a != b),
                    min(len(classes), len(config["classes"])))
        raise ArtifactError(f"class list mismatch: the adapter in {folder} was extracted over {len(config['classes'])} "
                            f"classes, this call gives {len(classes)}; they first differ at position {diff}; "
                            "score the saved list (its 'classes' field) in the same order")
    adapter = TransMiterAdapter(TransMiterConfig(**config["adapter"]))
    adapter.load_state_dict(load_file(str(Path(folder) / WEIGHTS_NAME)))
    return TransMiter(adapter.eval(), config["classes"], config["n_task"], config["prompt"]), config
