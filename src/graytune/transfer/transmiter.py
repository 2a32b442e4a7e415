"""TransMiter end to end: class scores, unsupervised extraction, forward-only transfer, TransMiter+.

Everything here needs only black-box access: query and class-prompt embeddings of
the weak and strong backbones (no gradient ever crosses a boundary), plus the
fine-tuned weak model's scores. Queries are images (a ``[N, 3, H, W]`` tensor,
through ``encode_image``) or texts (a list of strings, through ``encode_text``);
the classes are always prompts through the text tower. The two backbones may
have different embedding widths and tokenizers: everything past ``class_scores``
works on ``[N, M]`` scores over one shared class list.

Example:
    >>> tm = TransMiter.create(task_classes, total=1024, prompt="a picture of a {}")
    >>> tm.extract(tm.scores(weak, unlabeled), teacher_scores)           # teacher: [N, N_task]
    >>> strong_tm = tm.transfer(tm.scores(weak, unlabeled), tm.scores(strong, unlabeled))
    >>> strong_tm.predict(strong, test_pixels)                            # [B, N_task]
    >>> strong_tm.predict(strong, ["a word's definition", "another"])      # text queries: [2, N_task]
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from graytune.adapters import config_from_dict
from graytune.adapters.transmiter import TransMiterAdapter, TransMiterConfig
from graytune.artifact_files import read_config, read_weights, write_artifact
from graytune.errors import ArtifactError, InvalidInputError
from graytune.methods import METHODS, MethodKind, get_method
from graytune.schedules import adamw_warmup_cosine
from graytune.transfer.classes import DEFAULT_DRAW, expand_classes
from graytune.transfer.procrustes import orthogonal_procrustes

Tensor = torch.Tensor
#: what TransMiter scores: images ``[N, 3, H, W]`` or texts
Queries = Tensor | Sequence[str]
#: how logit noise is decided during extraction (``ExtractConfig.noise_per``)
NOISE_PER = ("batch", "sample")
#: the authors' β (``--reg_procrutes_coef 500``), an absolute number for their pool size
BETA = 500.0


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
    """Probability of adding logit noise: to a whole batch or to each sample (``noise_per``)."""
    noise_scale: float = 0.5
    """Noise std as a fraction of the sample's score std."""
    noise_per: str = "batch"
    """``"batch"``: one coin per batch, the whole batch noised or not (the authors' ``models/noise.py``);
    ``"sample"``: one coin per sample (the only behaviour before this option; ``scripts/transmiter_results.py``
    pins it so that ``docs/transmiter-concrete-raw.json`` regenerates)."""
    teacher_temperature: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.noise_per not in NOISE_PER:
            raise InvalidInputError(f"noise_per must be one of {', '.join(NOISE_PER)}; got {self.noise_per!r}")


@dataclass
class PlusConfig:
    """TransMiter+ (a few labels): cross-entropy fine-tuning, selected on validation accuracy."""

    lr: float = 1e-4
    weight_decay: float = 1e-3
    batch_size: int = 128
    epochs: int = 20
    """Passes over the labelled set (validated after each), unless ``max_steps`` is given."""
    max_steps: int | None = None
    """Optimizer steps in all (validated after each pass and at the last step); overrides ``epochs``."""
    warmup: float = 0.1
    seed: int = 0


@torch.no_grad()
def class_text(encoder: Encoder, names: Sequence[str], prompt: str, progress: bool = False) -> Tensor:
    """``[C, E]`` normalised embeddings of the class prompts (compute once, reuse for every image batch).

    ``progress`` shows a bar over the prompts on stderr.
    """
    chunks = []
    with tqdm(total=len(names), desc="class prompts", unit="prompt", disable=not progress, leave=False) as bar:
        for i in range(0, len(names), 256):
            chunks.append(encoder.encode_text([prompt.format(c) for c in names[i:i + 256]]).cpu())
            bar.update(len(chunks[-1]))
    return F.normalize(torch.cat(chunks), dim=-1)


def encode_queries(encoder: Encoder, queries: Queries) -> Tensor:
    """``[B, E]`` embeddings of images (a tensor, ``encode_image``) or texts (strings, ``encode_text``)."""
    if isinstance(queries, Tensor):
        return encoder.encode_image(queries)
    if isinstance(queries, str):
        raise InvalidInputError("text queries must be a list of strings, not one string")
    return encoder.encode_text(list(queries))


@torch.no_grad()
def class_scores(encoder: Encoder, queries: Queries, names: Sequence[str], prompt: str, batch_size: int = 128,
                 text: Tensor | None = None, progress: bool = False, desc: str = "scores") -> Tensor:
    """``[N, C]`` scores, 100 × cosine of query embeddings and class-prompt embeddings (forward only).

    ``queries`` are images ``[N, 3, H, W]`` or N texts (see ``encode_queries``). ``progress`` shows a
    bar over the queries (rate and ETA) on stderr, labelled ``desc``.
    """
    text = class_text(encoder, names, prompt, progress) if text is None else text
    chunks = []
    unit = "img" if isinstance(queries, Tensor) else "text"
    with tqdm(total=len(queries), desc=desc, unit=unit, disable=not progress) as bar:
        for i in range(0, len(queries), batch_size):
            chunks.append(F.normalize(encode_queries(encoder, queries[i:i + batch_size]).cpu(), dim=-1) @ text.T)
            bar.update(len(chunks[-1]))
    if not chunks:  # no queries: [0, C]
        return text.new_zeros(0, len(text))
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
               prompt: str = "a picture of a {}", generator: torch.Generator | None = None,
               aux_draw: str = DEFAULT_DRAW) -> TransMiter:
        """A fresh (identity) adapter over ``task_classes`` + auxiliary names drawn with ``seed``.

        ``aux_draw`` is how the auxiliary names are drawn (``graytune.transfer.classes``: ``balanced``, or
        ``concrete``, graytune's earlier draw). ``generator`` draws the adapter's initial weights (default:
        one seeded with ``seed``); torch's global random state is left untouched.
        """
        classes = expand_classes(task_classes, total, seed, draw=aux_draw)
        generator = generator or torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            adapter = TransMiterAdapter(TransMiterConfig(classes=total, dim=dim or total))
        return cls(adapter, classes, len(task_classes), prompt)

    # -- scores ----------------------------------------------------------------------------

    def scores(self, encoder: Encoder, queries: Queries, progress: bool = False, desc: str = "scores") -> Tensor:
        """``[N, M]`` zero-shot scores of images or texts over this class list (forward only).

        The M prompt embeddings are computed once per encoder and reused: encoders here are frozen
        (backbone handles, or a fine-tuned teacher that no longer trains). ``progress`` shows a bar
        over the queries on stderr.
        """
        cached = self._text.get(id(encoder))
        if cached is None or cached[0] is not encoder:
            cached = (encoder, class_text(encoder, self.classes, self.prompt, progress))
            self._text[id(encoder)] = cached
        return class_scores(encoder, queries, self.classes, self.prompt, text=cached[1], progress=progress,
                            desc=desc)

    @torch.no_grad()
    def predict(self, encoder: Encoder, queries: Queries, progress: bool = False) -> Tensor:
        """``[N, N_task]`` adapted task-class scores of images or texts."""
        return self.adapt(self.scores(encoder, queries, progress, desc="predict"))

    def adapt(self, scores: Tensor) -> Tensor:
        """Adapter on ``[N, M]`` scores, task classes kept: ``[N, N_task]``."""
        return self.adapter(scores)[:, :self.n_task]

    # -- the three phases ------------------------------------------------------------------------

    def extract(self, weak_scores: Tensor, teacher_task_scores: Tensor, config: ExtractConfig | None = None,
                progress: bool = True) -> list[float]:
        """Distil the fine-tuned weak model (teacher, ``[N, N_task]``) into adapter(weak zero-shot scores).

        No labels: the loss is KL between the teacher's task-class distribution
        (temperature 0.5) and the adapted weak scores'. Returns the loss per epoch. ``progress``
        shows a bar over optimizer steps with the loss on stderr.
        """
        config = config or ExtractConfig()
        if teacher_task_scores.shape != (len(weak_scores), self.n_task):
            raise InvalidInputError(f"teacher scores must be [{len(weak_scores)}, {self.n_task}] (task classes of "
                                    f"the same images); got {list(teacher_task_scores.shape)}")
        gen = torch.Generator().manual_seed(config.seed)
        teacher = F.softmax(teacher_task_scores / config.teacher_temperature, dim=-1)

        def loss_fn(idx: Tensor) -> Tensor:
            z = weak_scores[idx]
            noisy = torch.rand(len(z) if config.noise_per == "sample" else 1, 1, generator=gen) < config.noise_p
            noise = torch.randn(z.shape, generator=gen) * config.noise_scale * z.std(dim=-1, keepdim=True)
            student = F.log_softmax(self.adapt(z + noise * noisy), dim=-1)
            return F.kl_div(student, teacher[idx], reduction="batchmean")

        return self._optimise(loss_fn, len(weak_scores), config.lr, config.weight_decay, config.batch_size,
                              config.epochs, config.warmup, gen, progress=progress, desc="extract")

    @torch.no_grad()
    def transfer(self, weak_scores: Tensor, strong_scores: Tensor, beta: float = BETA,
                 beta_per_sample: float | None = None) -> TransMiter:
        """The adapter moved to the strong backbone by an orthogonal basis change; no backprop anywhere.

        ``weak_scores`` and ``strong_scores`` are both backbones' zero-shot scores
        of the same unlabeled queries (images or texts) over this class list, ``[N, M]`` each: the
        backbones' embedding widths and tokenizers never meet.

        ``beta`` pulls the basis change towards the identity. The data term ``H_tᵀH_s`` grows with N
        (each standardised row has squared norm M − 1), so a fixed β weighs less the more queries
        there are; ``beta_per_sample`` (when given, replacing ``beta``) uses β = ``beta_per_sample`` × N,
        which keeps the balance whatever N is (see ``procrustes_beta``).
        """
        if weak_scores.shape != strong_scores.shape or weak_scores.shape[1] != len(self.classes):
            raise InvalidInputError(f"transfer needs both backbones' scores of the same images over the "
                                    f"{len(self.classes)} saved classes; got {list(weak_scores.shape)} and "
                                    f"{list(strong_scores.shape)}")
        beta = procrustes_beta(len(weak_scores), beta, beta_per_sample)
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
                 config: PlusConfig | None = None, progress: bool = True) -> dict[str, float]:
        """TransMiter+: cross-entropy on a few labels; keeps the pass best on validation accuracy.

        Returns the best ``val_accuracy``, its ``epoch`` (0: the transferred adapter itself) and
        ``steps``, the optimizer steps taken in all (``config.max_steps`` when given: with 80 labels at
        batch 128 a pass is one step, so 20 passes are 20 steps). ``progress`` shows a bar over
        optimizer steps with the loss and validation accuracy on stderr.
        """
        config = config or PlusConfig()
        gen = torch.Generator().manual_seed(config.seed)
        best = {"val_accuracy": self.accuracy(val_scores, val_labels), "epoch": 0.0}
        best_state = copy.deepcopy(self.adapter.state_dict())

        def on_epoch(epoch: int) -> dict[str, str]:
            nonlocal best_state
            acc = self.accuracy(val_scores, val_labels)
            if acc > best["val_accuracy"]:
                best.update(val_accuracy=acc, epoch=float(epoch))
                best_state = copy.deepcopy(self.adapter.state_dict())
            return {"val_acc": f"{acc:.1f}%", "best": f"{best['val_accuracy']:.1f}%"}

        self._optimise(lambda idx: F.cross_entropy(self.adapt(scores[idx]), labels[idx]), len(scores), config.lr,
                       config.weight_decay, config.batch_size, config.epochs, config.warmup, gen, on_epoch,
                       max_steps=config.max_steps, progress=progress, desc="transmiter+")
        self.adapter.load_state_dict(best_state)
        self.adapter.eval()
        steps = total_steps(len(scores), config.batch_size, config.epochs, config.max_steps)
        return {**best, "steps": float(steps)}

    @torch.no_grad()
    def accuracy(self, scores: Tensor, labels: Tensor) -> float:
        self.adapter.eval()
        return float((self.adapt(scores).argmax(-1) == labels).float().mean())

    def _optimise(self, loss_fn: Any, n: int, lr: float, weight_decay: float, batch_size: int, epochs: int,
                  warmup: float, gen: torch.Generator, on_epoch: Any = None, max_steps: int | None = None,
                  progress: bool = False, desc: str = "optimise") -> list[float]:
        """AdamW with warm-up then cosine over ``max_steps`` steps (default: ``epochs`` passes); loss per pass.

        ``on_epoch(epoch)`` runs after each pass and may return fields to show beside the loss on the bar.

        Why not ``graytune.train.loop.fit``: this follows the authors' protocol, ⌈N / batch⌉ steps a pass with
        the last batch short, order and logit noise drawn from one generator; ``fit`` steps full batches only
        and refuses a set smaller than one (TransMiter+ at 16 shots × 5 base classes is 80 labels at batch 128:
        one short batch a pass, which ``fit`` refuses), so moving it would change every committed TransMiter
        number. It needs no checkpoint or call budget either: it runs in seconds on scores computed once,
        with no call through the boundary.
        """
        self.adapter.train()
        total = total_steps(n, batch_size, epochs, max_steps)
        opt, sched = adamw_warmup_cosine(self.adapter.parameters(), lr, weight_decay, total, warmup)
        history, step, epoch, shown = [], 0, 0, {}
        with tqdm(total=total, desc=desc, unit="step", disable=not progress) as bar:
            while step < total:
                epoch += 1
                order, running, batches = torch.randperm(n, generator=gen), 0.0, 0
                for start in range(0, n, batch_size):
                    loss = loss_fn(order[start:start + batch_size])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    running, batches, step = running + float(loss.detach()), batches + 1, step + 1
                    bar.set_postfix(loss=f"{running / batches:.4f}", epoch=epoch, **shown, refresh=False)
                    bar.update()
                    if step >= total:
                        break
                history.append(running / batches)
                if on_epoch is not None:
                    shown = on_epoch(epoch) or {}
                    bar.set_postfix(loss=f"{history[-1]:.4f}", epoch=epoch, **shown)
                    self.adapter.train()
        self.adapter.eval()
        return history


def total_steps(n: int, batch_size: int, epochs: int, max_steps: int | None = None) -> int:
    """Optimizer steps of a run over ``n`` samples: ``max_steps`` when given, else ``epochs`` passes of
    ⌈n / batch_size⌉ steps (the last batch of a pass may be short)."""
    return max_steps or max(1, math.ceil(n / batch_size)) * epochs


def procrustes_beta(n: int, beta: float = BETA, per_sample: float | None = None) -> float:
    """The β a basis change over ``n`` queries uses: ``per_sample`` × n when given, else ``beta``.

    Example:
        >>> procrustes_beta(800, per_sample=0.625)   # the authors' 500 at 16 shots × 50 base classes
        500.0
    """
    for name, value in (("beta", beta), ("beta_per_sample", per_sample)):
        if value is not None and value < 0:
            raise InvalidInputError(f"{name} must be >= 0; got {value}")
    return float(beta if per_sample is None else per_sample * n)


def save_transmiter(tm: TransMiter, folder: str | os.PathLike[str], backbone: str, fingerprint: str,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter, its class list and prompt in the one artifact format (``graytune.artifact_files``)."""
    config = {"method": "transmiter", "kind": get_method("transmiter").kind.value, "access": "black-box",
              "reads": [], "backbone": backbone, "fingerprint": fingerprint,
              "options": {"transmiter": asdict(tm.adapter.config)},
              "adapters": [{"name": "transmiter", "modality": None, "ports": ["logits"], "reads": []}],
              "trainable_parameters": sum(p.numel() for p in tm.adapter.parameters()),
              "classes": tm.classes, "n_task": tm.n_task, "prompt": tm.prompt, **(extra or {})}
    return write_artifact(folder, config, tm.adapter.state_dict())


def load_transmiter(folder: str | os.PathLike[str], classes: Sequence[str] | None = None) -> tuple[TransMiter, dict]:
    """The saved TransMiter and its config; ``classes``, when given, must be the saved list in order."""
    config = read_config(folder)
    if config.get("method") not in METHODS or get_method(config["method"]).kind is not MethodKind.LOGIT:
        raise ArtifactError(f"{folder} holds a {config.get('method')!r} adapter, not a TransMiter one")
    saved = config["classes"]
    if classes is not None and list(classes) != saved:
        diff = next((i for i, (a, b) in enumerate(zip(classes, saved)) if a != b), min(len(classes), len(saved)))
        raise ArtifactError(f"class list mismatch: the adapter in {folder} was extracted over {len(saved)} "
                            f"classes, this call gives {len(classes)}; they first differ at position {diff}; "
                            "score the saved list (its 'classes' field) in the same order")
    options = (config.get("options") or {}).get("transmiter") or config.get("adapter")  # format 1: "adapter"
    adapter = TransMiterAdapter(config_from_dict(TransMiterConfig, options, "transmiter"))
    state = read_weights(folder, config)
    try:
        adapter.load_state_dict(state)
    except RuntimeError as err:
        raise ArtifactError(f"{folder}: the tensors do not fit a TransMiter with options {options} ({err})") from None
    return TransMiter(adapter.eval(), saved, config["n_task"], config["prompt"]), config
