"""A language model's task: learn to write each prompt's completion.

Loss: the mean negative log-likelihood of the completion's tokens (the end-of-sequence token
included, so the model learns to stop), from the boundary's ``text.target_logprobs``. Evaluation:
``exact_match`` of the generated answer (the owner decodes greedily; any accepted answer counts,
compared without case, surrounding spaces and end punctuation, up to the first line break when the
answer has none) and ``nll``, the per-token negative log-likelihood of the completions (lower is better).
Selection uses ``exact_match``.

Prompts and completions are tokenized together by the owner's tokenizer (``handle.tokenize``); the
completion's targets start where the prompt's own tokens end. Chat rows are rendered with the
backbone's chat template (published in its spec) before tokenizing.

Example:
    >>> task = CompletionTask(splits.train, handle)
    >>> loss = task.loss(model, next(task.batches(8, generator)))
    >>> task.evaluate(model, splits.test)["exact_match"]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from graytune.access import Handle
from graytune.data.completions import Completions
from graytune.errors import InvalidInputError
from graytune.model import AdaptedModel
from graytune.train.tasks import epoch_batches

Tensor = torch.Tensor
IGNORE = -100
#: most tokens an evaluation lets the model write past the longest answer
EXTRA_TOKENS = 2


class CompletionTask:
    """Prompt → completion training and evaluation for a causal language model behind the boundary."""

    primary = "exact_match"

    def __init__(self, data: Completions, handle: Handle, eval_batch: int = 16) -> None:
        self.data, self.handle, self.eval_batch = data, handle, eval_batch
        text = handle.spec.preprocess.get("text", {})
        ends = text.get("eos_token_ids") or []
        self.pad_id = int(text.get("pad_token_id") if text.get("pad_token_id") is not None else (ends or [0])[0])
        self.eos_id = ends[0] if ends else None  # appended to every completion: the model learns to stop
        self.template = text.get("chat_template") if isinstance(text.get("chat_template"), str) else None
        self.rows = self.encode(data)

    def __len__(self) -> int:
        return len(self.data)

    def encode(self, data: Completions) -> list[tuple[list[int], int]]:
        """Per row: the ids of prompt + completion (+ end token) and how many of them are the prompt's."""
        prompts = [self.prompt_text(data, i) for i in range(len(data))]
        full = _token_lists(self.handle, [p + c for p, c in zip(prompts, data.completions)])
        alone = _token_lists(self.handle, prompts)
        rows = []
        for ids, prompt_ids in zip(full, alone):
            n = 0
            while n < min(len(ids), len(prompt_ids)) and ids[n] == prompt_ids[n]:
                n += 1  # the shared prefix: a merge across the boundary belongs to the completion
            if n >= len(ids):
                raise InvalidInputError(f"a completion of {data.name} adds no token to its prompt; every row needs "
                                        "a non-empty completion")
            rows.append((ids + ([int(self.eos_id)] if self.eos_id is not None else []), max(n, 1)))
        return rows

    def prompt_text(self, data: Completions, i: int) -> str:
        """Row ``i``'s prompt as text (chat rows rendered with the backbone's chat template)."""
        if data.prompts and data.prompts[i] is not None:
            return str(data.prompts[i])
        if not self.template:
            raise InvalidInputError(f"{data.name} holds chat messages, but {self.handle.spec.id} publishes no chat "
                                    "template; write prompt/completion rows instead")
        return render_chat(self.template, data.messages[i] or (), self.handle.spec.preprocess.get("text", {}))

    def batches(self, batch_size: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[dict[str, Tensor]]:
        for idx in epoch_batches(len(self.data), batch_size, generator, shard):
            yield self.collate([self.rows[i] for i in idx])

    def collate(self, rows: Sequence[tuple[list[int], int]]) -> dict[str, Tensor]:
        """``text.input_ids``, ``text.attention_mask``, ``text.target_ids`` ``[B, L]``, right-padded."""
        length = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        target = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        for b, (row, n_prompt) in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = 1
            target[b, n_prompt - 1:len(row) - 1] = torch.tensor(row[n_prompt:])  # position t predicts t + 1
        return {"text.input_ids": ids, "text.attention_mask": mask, "text.target_ids": target}

    def loss(self, model: AdaptedModel, batch: dict[str, Tensor]) -> Tensor:
        logprobs = model.target_logprobs(batch)  # [B, L]
        count = (batch["text.target_ids"] != IGNORE).sum().clamp(min=1).to(logprobs.device)
        return -logprobs.sum() / count

    @torch.no_grad()
    def evaluate(self, model: AdaptedModel, data: Completions) -> dict[str, float]:
        rows = self.rows if data is self.data else self.encode(data)
        total, count = 0.0, 0
        for start in range(0, len(rows), self.eval_batch):
            batch = self.collate(rows[start:start + self.eval_batch])
            total -= float(model.target_logprobs(batch).sum())
            count += int((batch["text.target_ids"] != IGNORE).sum())
        return {"exact_match": self.exact_match(model, data, rows), "nll": total / max(1, count)}

    def exact_match(self, model: AdaptedModel, data: Completions, rows: list[tuple[list[int], int]]) -> float:
        """The share of rows whose greedy generation is an accepted answer."""
        longest = max(len(ids) - n for ids, n in rows)
        settings = {"max_new_tokens": min(longest + EXTRA_TOKENS, 256)}
        right = 0
        for start in tqdm(range(0, len(rows), self.eval_batch), desc="generate", unit="batch", leave=False,
                          disable=None):
            chunk = rows[start:start + self.eval_batch]
            prompts = self.collate([(ids[:n], n) for ids, n in chunk])
            del prompts["text.target_ids"]
            texts = model.generate(prompts, settings).texts
            right += sum(matches(text, data.accepted(start + i)) for i, text in enumerate(texts))
        return right / max(1, len(rows))


def matches(generated: str, accepted: Sequence[str]) -> bool:
    """Whether ``generated`` is one of ``accepted`` (case, spaces and end punctuation aside; one line unless the
    answer has several)."""
    for answer in accepted:
        text = generated if "\n" in answer.strip() else generated.strip().split("\n")[0]
        if normalise(text) == normalise(answer):
            return True
    return False


def normalise(text: str) -> str:
    return " ".join(text.split()).strip(" .,;:!?\"'").lower()


def render_chat(template: str, messages: Sequence[dict[str, str]], text_spec: dict[str, Any]) -> str:
    """The chat ``messages`` rendered with a Jinja chat template, ending where the assistant's answer starts."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def refuse(message: str) -> None:
        raise InvalidInputError(f"the chat template refused these messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = refuse
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=True,
                                                bos_token=text_spec.get("bos_token", ""),
                                                eos_token=text_spec.get("eos_token", ""))
    except jinja2.TemplateError as err:
        raise InvalidInputError(f"the backbone's chat template failed on these messages: {err}") from None


def _token_lists(handle: Handle, texts: list[str], chunk: int = 256) -> list[list[int]]:
    """Each text's ids (padding removed), tokenized by the owner in chunks."""
    out: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        batch = handle.tokenize(texts[start:start + chunk])
        for ids, mask in zip(batch["text.input_ids"], batch["text.attention_mask"]):
            out.append(ids[mask.bool()].tolist())
    return out
