"""What one request may ask of the server, checked before any work, and the answers when it asks too much.

A request's work is bounded before it is tokenized or run: strings by count and
characters (``--max-texts``, ``--max-text-chars``, ``--max-request-chars``), a forward
by its token positions (rows x tokens, inserted tokens included: ``--max-tokens``, or
``--max-grad-tokens`` when it wants gradients) and its pixels (rows x height x width:
``--max-pixels``, ``--max-grad-pixels``), a hosted ``classify`` by the
prompts it would build (classes x template). Past a limit the answer is 413 naming
the limit, the flag and what to do.

A request that wants gradients is also checked for rows it repeats (``repeated_rows``): one
call over E identical rows with E one-hot output gradients returns a whole E-row Jacobian,
so the owner may count or refuse such batches (``--duplicate-rows``). Rows are compared as the
backbone sees them (``seen_rows``): values under attention mask 0 do not make a row distinct.

Example:
    >>> check_texts(["a cat"] * 5000, ServeConfig())
    Traceback (most recent call last):
    HTTPProblem: 5000 strings in one request; the server takes at most 4096 (--max-texts); ...
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from graytune.access.wire import CALL_GROUPS, Message
from graytune.serve.config import ServeConfig
from graytune.types import is_prompts_port


class HTTPProblem(Exception):
    """An answer other than 200, with a short public message (and optional headers, e.g. Retry-After)."""

    def __init__(self, status: int, kind: str, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail
        self.headers = dict(headers or {})


def too_large(what: str, limit: int, flag: str, fix: str) -> HTTPProblem:
    return HTTPProblem(413, "too_large", f"{what}; the server takes at most {limit:,} ({flag}); {fix}")


def busy(retry_after_s: float, why: str = "the backbone is busy", queued: int | None = None) -> HTTPProblem:
    """503 with ``Retry-After`` (whole seconds, at least 1) and, when given, ``X-Graytune-Queued``: the
    requests waiting for or using the backbone (what the client keeps as ``RemoteHandle.queue_state``)."""
    seconds = max(1, math.ceil(retry_after_s))
    headers = {"Retry-After": str(seconds)} | ({} if queued is None else {"X-Graytune-Queued": str(queued)})
    return HTTPProblem(503, "busy", f"{why}; retry in {seconds} s", headers)


def check_texts(texts: Sequence[str], config: ServeConfig, what: str = "strings") -> None:
    """Count and characters of ``texts`` against the limits (before tokenizing)."""
    if len(texts) > config.max_texts:
        raise too_large(f"{len(texts):,} {what} in one request", config.max_texts, "--max-texts",
                        "split them over several requests")
    longest = max((len(t) for t in texts), default=0)
    if longest > config.max_text_chars:
        index = next(i for i, t in enumerate(texts) if len(t) == longest)
        raise too_large(f"string {index} has {longest:,} characters", config.max_text_chars, "--max-text-chars",
                        "shorten it (the backbone reads only its first tokens anyway)")
    total = sum(len(t) for t in texts)
    if total > config.max_request_chars:
        raise too_large(f"the {what} hold {total:,} characters in all", config.max_request_chars,
                        "--max-request-chars", "split them over several requests")


def check_prompts(classes: Sequence[str], template: str, config: ServeConfig) -> None:
    """The prompts ``template.replace("{}", c)`` for ``classes`` against the text limits, before building them."""
    if len(classes) > config.max_texts:
        raise too_large(f"{len(classes):,} classes in one request", config.max_texts, "--max-texts",
                        "classify against fewer classes per request")
    slots = template.count("{}")
    lengths = [len(template) + slots * (len(c) - 2) for c in classes]
    longest = max(lengths, default=0)
    if longest > config.max_text_chars:
        raise too_large(f"a prompt of {longest:,} characters (template x class name)", config.max_text_chars,
                        "--max-text-chars", "use a shorter template")
    if sum(lengths) > config.max_request_chars:
        raise too_large(f"{len(classes):,} prompts of {sum(lengths):,} characters in all (classes x template)",
                        config.max_request_chars, "--max-request-chars", "use a shorter template or fewer classes")


def check_work(inputs: Mapping[str, torch.Tensor], insert: Mapping[str, torch.Tensor], config: ServeConfig,
               grad: bool, new_tokens: int = 0) -> None:
    """Token positions and pixels a forward would run, from its tensors' shapes (before the backbone runs).

    A request that wants gradients keeps the graph for its backward, about five times the memory,
    so it has limits of its own (``--max-grad-tokens``, ``--max-grad-pixels``).

    Args:
        inputs: port → ``[B, L]`` ids, ``[B, C, H, W]`` pixels or ``latents.noisy`` (against
            ``--max-denoising-work``; other inputs are not counted).
        insert: port → ``[B or 1, K, D]`` tokens; each adds ``K`` positions to its modality's rows, except
            that a modality's prompts ports (``<m>.prompts.k``, which write over each other's tokens) add
            theirs once.
        grad: whether the request wants gradients.
        new_tokens: tokens a generation adds to each row (``max_new_tokens``), counted as positions too.
    """
    tokens, token_flag = (config.max_grad_tokens, "--max-grad-tokens") if grad else (config.max_tokens,
                                                                                       "--max-tokens")
    pixels, pixel_flag = (config.max_grad_pixels, "--max-grad-pixels") if grad else (config.max_pixels,
                                                                                      "--max-pixels")
    kind = " with gradients" if grad else ""
    for name, value in inputs.items():
        modality = name.split(".")[0]
        if name.endswith(".input_ids") and value.dim() == 2:
            rows, length = value.shape
            counts = [(is_prompts_port(port), int(t.shape[1])) for port, t in insert.items()
                      if port.startswith(modality + ".") and t.dim() == 3]
            extra = sum(k for prompts, k in counts if not prompts) + max((k for prompts, k in counts if prompts),
                                                                          default=0)
            positions = rows * (length + extra + new_tokens)
            if positions > tokens:
                more = f" with {new_tokens:,} new tokens each" if new_tokens else ""
                raise too_large(f"this request holds {positions:,} token positions{kind} ({rows:,} rows x "
                                f"{length + extra + new_tokens:,}{more})", tokens, token_flag, "send smaller batches")
        elif name == "latents.noisy" and value.dim() == 4:  # one UNet step per row
            rows, _, height, width = value.shape
            if rows * height * width > config.max_denoising_work:
                raise too_large(f"this request holds {rows * height * width:,} latent positions{kind} ({rows:,} "
                                f"latents of {height} x {width}, one UNet step each)", config.max_denoising_work,
                                "--max-denoising-work", "send fewer or smaller latents per request")
        elif name.endswith(".pixels") and value.dim() == 4:
            rows, _, height, width = value.shape
            if rows * height * width > pixels:
                raise too_large(f"this request holds {rows * height * width:,} pixels{kind} ({rows:,} images of "
                                f"{height} x {width})", pixels, pixel_flag, "send fewer or smaller images per request")


def tokens_of(inputs: Mapping[str, torch.Tensor]) -> int:
    """The real tokens of a checked request's texts: the sum of its attention masks (``--quota-tokens``)."""
    return sum(int(mask.sum()) for name, mask in inputs.items() if name.endswith(".attention_mask"))


def repeated_rows(rows: int, tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """Rows of a batch that repeat an earlier row exactly: ``{row: the first row it repeats}``.

    Args:
        rows: the batch size.
        tensors: every tensor that holds one slice per row along dim 0 (``[rows, ...]``): the inputs and the
            per-row edits; tensors shared by all rows are left out by the caller. Two rows are the same when
            every tensor's slices are equal value for value (``-0.0`` equals ``0.0``).

    Example:
        >>> repeated_rows(3, [torch.tensor([[1, 2], [3, 4], [1, 2]])])
        {2: 0}
    """
    slices = []
    for tensor in tensors:
        flat = tensor.detach().reshape(rows, -1).cpu()
        slices.append((flat + 0.0 if flat.is_floating_point() else flat).contiguous().numpy())  # -0.0 → 0.0
    first: dict[bytes, int] = {}
    repeats: dict[int, int] = {}
    for row in range(rows):
        digest = hashlib.blake2b(digest_size=16)
        for values in slices:
            digest.update(values[row].tobytes())
        key = digest.digest()
        if key in first:
            repeats[row] = first[key]
        else:
            first[key] = row
    return repeats


def seen_rows(rows: int, inputs: Mapping[str, torch.Tensor], add: Mapping[str, torch.Tensor],
              insert: Mapping[str, torch.Tensor], ranks: Mapping[str, int]) -> list[torch.Tensor]:
    """The per-row tensors of a checked call as the backbone sees them, for ``repeated_rows``.

    Positions under attention mask 0 (and, for a causal LM, with no target) change no output, so token ids
    there, and ``add`` values there at ``<m>.token_embeds`` (and at ``<m>.layer.k`` when nothing is inserted in
    that modality, so that positions line up), are set to 0: rows that differ only in such columns are the
    same row. Tensors shared by all rows (a ``[1, ...]`` or broadcast edit) are left out.

    Args:
        rows: the batch size.
        inputs, add, insert: a ``CallPlan``'s groups.
        ranks: each port's rank in the spec (an ``add`` of full rank holds one slice per row).
    """
    ignored: dict[str, torch.Tensor] = {}  # modality → [B, L] True where a position changes nothing
    for name, mask in inputs.items():
        if name.endswith(".attention_mask"):
            prefix = name.rsplit(".", 1)[0]
            free = mask == 0
            targets = inputs.get(f"{prefix}.target_ids")
            ignored[prefix] = free if targets is None else free & (targets == -100)
    seen = []
    for name, tensor in inputs.items():
        prefix = name.rsplit(".", 1)[0]
        if name.endswith(".input_ids") and prefix in ignored and tensor.shape == ignored[prefix].shape:
            tensor = tensor.masked_fill(ignored[prefix], 0)
        seen.append(tensor)
    inserted = {name.split(".")[0] for name in insert}
    for name, delta in add.items():
        if delta.dim() != ranks[name] or delta.shape[0] != rows:
            continue
        prefix, port = name.split(".")[0], name.split(".", 1)[1]
        free = ignored.get(prefix)
        aligned = port == "token_embeds" or (port.startswith("layer.") and prefix not in inserted)
        if free is not None and aligned and delta.dim() == 3 and delta.shape[1] == free.shape[1]:
            delta = delta.masked_fill(free.unsqueeze(-1), 0.0)
        seen.append(delta)
    seen.extend(t for t in insert.values() if t.shape[0] == rows)
    return seen


def forward_digest(message: Message) -> str:
    """A digest of what a forward sends through the backbone (its ``inputs``/``add``/``insert`` tensors and
    texts): its recompute, which resends the same, has the same one (the quota's receipt, ``QuotaLedger``)."""
    tensors, meta = message
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        if name.partition("/")[0] in CALL_GROUPS:
            tensor = tensors[name].detach().contiguous().cpu()
            digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    digest.update(json.dumps(meta.get("texts"), ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def duplicate_problem(rows: int, repeats: Mapping[int, int]) -> HTTPProblem:
    """The 403 for a gradient request whose ``repeats`` (from ``repeated_rows``) the owner refuses."""
    shown = ", ".join(f"{row} = {earlier}" for row, earlier in list(repeats.items())[:5])
    more = f" and {len(repeats) - 5} more" if len(repeats) > 5 else ""
    return HTTPProblem(
        403, "duplicate_rows",
        f"this request wants gradients for {rows:,} rows and {len(repeats):,} of them repeat an earlier row exactly "
        f"(rows {shown}{more}); such a batch returns many rows of one input's Jacobian in one call, and this server "
        "refuses it (--duplicate-rows refuse): send each distinct row once (the gradient of a repeated row is the "
        "sum of its rows' output gradients)")
