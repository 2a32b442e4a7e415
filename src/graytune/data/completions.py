"""A language model's task data: prompts and the completions it should write.

Sources:

- a JSONL file of ``{"prompt": ..., "completion": ...}`` rows, or of OpenAI chat rows
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` whose last message is the
  assistant's answer (the rest is the prompt, rendered with the backbone's chat template); an optional
  ``split`` field (train/val/test) as for the other formats;
- built-in sets from the real local data (Debian ``wordnet-base`` and ``fortunes``): classification as
  generation (``wordnet-category``: gloss → its category word; ``fortunes-topic``: quote → its topic) and
  one generation task (``wordnet-reverse``, a reverse dictionary: gloss → the word, exact match, any
  single-word lemma of the synset accepted).

Example:
    >>> data = read_completions(Path("qa.jsonl"))
    >>> data.prompts[0], data.completions[0]
    ('Q: 2+2?\\nA:', ' 4')
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graytune.data.files import split_name
from graytune.data.labeled import LabeledTexts
from graytune.errors import InvalidInputError

ROLES = ("system", "user", "assistant")
#: characters of a quote or gloss a built-in prompt keeps (long fortunes would dominate the context)
MAX_TEXT_CHARS = 300


@dataclass(frozen=True)
class Completions:
    """Prompt → completion pairs.

    Attributes:
        prompts: the text before the answer (for chat rows: None, see ``messages``).
        completions: what the model should write (a built-in set's start with a space).
        answers: per row, the answers exact match accepts (the completion, or e.g. a synset's other lemmas).
        messages: per row, the chat messages before the answer (chat rows), else None.
    """

    name: str
    prompts: tuple[str | None, ...]
    completions: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...] = ()
    messages: tuple[tuple[dict[str, str], ...] | None, ...] = field(default=())
    splits: tuple[str | None, ...] = ()

    def __len__(self) -> int:
        return len(self.completions)

    def subset(self, indices: Sequence[int]) -> Completions:
        pick = list(indices)

        def take(values: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(values[i] for i in pick) if values else ()

        return Completions(self.name, take(self.prompts), take(self.completions), take(self.answers),
                           take(self.messages), take(self.splits))

    def accepted(self, i: int) -> tuple[str, ...]:
        """The answers row ``i`` accepts."""
        return self.answers[i] if self.answers else (self.completions[i],)


def read_completions(path: Path) -> Completions:
    """Rows of a JSONL file (see the module docstring); each error names the file, line and what to write.

    Raises:
        InvalidInputError: not UTF-8, not JSON, a row with neither prompt/completion nor messages, a chat
            row whose last message is not the assistant's, empty completions.
    """
    if not path.is_file():
        raise InvalidInputError(f"no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise InvalidInputError(f"{path} line {line} is not UTF-8 (byte {err.object[err.start]:#x}); save the "
                                "file as UTF-8") from None
    prompts, completions, messages, splits = [], [], [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        prompt, completion, chat, split = _row(path, n, line)
        prompts.append(prompt)
        completions.append(completion)
        messages.append(chat)
        splits.append(split)
    if not completions:
        raise InvalidInputError(f"{path} holds no rows; write one JSON object per line with prompt and completion")
    return Completions(path.stem, tuple(prompts), tuple(completions), (), tuple(messages), tuple(splits))


def _row(path: Path, n: int, line: str) -> tuple[str | None, str, tuple[dict[str, str], ...] | None, str | None]:
    where = f"{path} line {n}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise InvalidInputError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); each line must be "
                                'one object such as {"prompt": "Q: 2+2?\\nA:", "completion": " 4"}') from None
    if not isinstance(item, dict):
        raise InvalidInputError(f"{where}: expected a JSON object, got {type(item).__name__}")
    split = split_name(item.get("split"), where)
    if "messages" in item:
        chat = _messages(where, item["messages"])
        return None, chat[-1]["content"], chat[:-1], split
    prompt, completion = item.get("prompt"), item.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise InvalidInputError(f"{where}: each row needs string fields prompt and completion, or OpenAI chat "
                                f"messages; got fields {sorted(item)}")
    if not completion.strip():
        raise InvalidInputError(f"{where}: the completion is empty; there is nothing to learn from this row")
    return prompt, completion, None, split


def _messages(where: str, value: object) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or len(value) < 2:
        raise InvalidInputError(f"{where}: messages must be a list of at least two messages (the prompt's and "
                                "the assistant's answer)")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES or \
                not isinstance(message.get("content"), str):
            raise InvalidInputError(f"{where}: message {i} must be {{'role': one of {', '.join(ROLES)}, "
                                    f"'content': a string}}; got {message!r:.80}")
        out.append({"role": message["role"], "content": message["content"]})
    if out[-1]["role"] != "assistant" or not out[-1]["content"].strip():
        raise InvalidInputError(f"{where}: the last message must be the assistant's (non-empty) answer: it is what "
                                f"the model learns to write; got role {out[-1]['role']!r}")
    return tuple(out)


# ---- built-in sets ----------------------------------------------------------------------------------

def from_labels(data: LabeledTexts, template: str, name: str) -> Completions:
    """Classification as generation: ``template.format(text=..., classes=...)`` → `` <class name>``."""
    classes = ", ".join(data.class_names)
    prompts = tuple(template.format(text=_clip(t), classes=classes) for t in data.texts)
    words = tuple(f" {data.class_names[int(y)]}" for y in data.labels)
    return Completions(name, prompts, words, tuple((w.strip(),) for w in words))


def reverse_dictionary(nouns: dict[str, tuple[int, tuple[str, ...], str]], seed: int = 0) -> Completions:
    """WordNet as a reverse dictionary: ``Definition: <gloss>\\nWord:`` → `` <lemma>``, single lowercase words only.

    Synsets whose gloss contains the word are left out (the answer would be in the prompt); any
    single-word lemma of the synset counts as a right answer.
    """
    rows = []
    for _wnid, (_lexfile, lemmas, gloss) in sorted(nouns.items()):
        words = tuple(w for w in lemmas if w.isalpha() and w.islower() and 3 <= len(w) <= 14)
        if words and gloss and words[0] not in gloss.lower() and lemmas[0] == words[0]:
            rows.append((f"Definition: {_clip(gloss)}\nWord:", f" {words[0]}", words))
    random.Random(seed).shuffle(rows)
    return Completions("wordnet-reverse", tuple(r[0] for r in rows), tuple(r[1] for r in rows),
                       tuple(r[2] for r in rows))


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS].rsplit(" ", 1)[0] + " …"
