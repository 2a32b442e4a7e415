"""What a client learns about the token-embedding table: recovered geometry, and rows read outright.

**Geometry probe** (dark-gray and up): the attacker picks K tokens and a placeholder token p. It sends
each token in a few short contexts once (one call: the targets), then sends the same rows with p in
its place and learns, by gradient descent through the boundary's VJP (AdamW, cosine-decayed), a vector
δₖ added at p's position (``add`` at ``text.token_embeds``) so that the outputs match the targets: each
step is a forward and its VJP, two calls. If the outputs match, E[p] + δₖ stands in for E[tₖ], so the
δₖ carry the table's relative geometry without the attacker ever reading a row. Scored against the
true rows (the owner's):

- ``pairwise_cosine_correlation``: Pearson correlation between the K(K−1)/2 pairwise cosines of the
  centred δₖ and of the centred true rows (the mean of the K removes the unknown E[p]);
- ``row_error``: mean ‖δₖ − (E[tₖ] − E[p])‖ / ‖E[tₖ] − E[p]‖ (0: the exact rows, up to the offset);
- ``output_error``: the relative output mismatch reached.

**Exact rows** under a ``read`` grant of ``text.token_embeds``: a forward that asks no outputs and
reads the port returns the table's rows for every id sent; the whole vocabulary comes back in
``ceil(V / ids per call)`` calls. Nothing needs to be learnt: the grant hands over that part of the weights.

Example:
    >>> geometry = embedding_geometry(handle, pool_texts, truth, calls=200, tokens=16, seed=0)
    >>> geometry["pairwise_cosine_correlation"]
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from graytune.audit.extraction import log_checkpoints
from graytune.audit.meter import CallMeter
from graytune.errors import InvalidInputError, RemoteError

log = logging.getLogger(__name__)
Tensor = torch.Tensor
PORT = "text.token_embeds"
CONTEXTS = 4  # short texts each token is placed in
LR = 0.05  # AdamW's first step on each coordinate of δ, decayed to 0 over the calls (cosine)
#: decoupled weight decay: pulls δ out of the directions the output cannot see (LayerNorm's), which would
#: otherwise drift and blur the geometry (on MiniLM at 100 calls: row error 0.70 with it, 4.05 without)
WEIGHT_DECAY = 5.0
#: ids per call when reading the table: a server's default --max-tokens (16,384 positions)
READ_POSITIONS = 16384
Truth = Callable[[Tensor], Tensor]  # the owner's rows for ids [N] → [N, D]


def embedding_geometry(handle: Any, texts: Sequence[str], truth: Truth | None, calls: int, tokens: int, seed: int,
                       progress: bool = True) -> dict[str, Any]:
    """Recover the relative geometry of ``tokens`` embedding rows within ``calls`` boundary calls."""
    meter = CallMeter(handle, calls)
    targets, rows, placeholder = _rows(handle, texts, tokens, seed)
    ids, mask, position = rows
    k = len(targets)
    dim = int(handle.spec.port(PORT).shape[-1])
    out = handle.spec.port("text.embeds").name
    with torch.no_grad():
        wanted = _with_token(ids, position, torch.tensor(targets).repeat_interleave(CONTEXTS))
        target = handle.forward({"text.input_ids": wanted, "text.attention_mask": mask}, outputs=[out])[out]
    sent = _with_token(ids, position, torch.full((k * CONTEXTS,), placeholder))
    # small random starting points: zeros would make the K rows of a context repeat each other at the first step,
    # which a server run with --duplicate-rows refuse would refuse
    delta = (1e-4 * torch.randn(k, dim, generator=torch.Generator().manual_seed(seed))).requires_grad_(True)
    optimizer = torch.optim.AdamW([delta], lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, (calls - 1) // 2))
    owner = _owner_rows(truth, targets, placeholder)
    marks, curve, error, stopped = log_checkpoints(calls), [], float("nan"), None
    with tqdm(total=calls, desc=f"{handle.access.label} embedding geometry", unit="call", disable=not progress) as bar:
        while meter.afford(2):
            optimizer.zero_grad()
            edit = torch.zeros(k * CONTEXTS, ids.shape[1], dim)
            edit = edit.index_put((torch.arange(k * CONTEXTS), position), delta.repeat_interleave(CONTEXTS, 0))
            try:
                z = handle.forward({"text.input_ids": sent, "text.attention_mask": mask}, add={PORT: edit},
                                   outputs=[out])[out]
                loss = (z - target).pow(2).sum() / target.pow(2).sum()
                loss.backward()
            except RemoteError as err:
                if err.status not in (403, 429):
                    raise
                stopped = str(err)
                log.warning("the geometry probe stopped after %d calls: %s", meter.calls, err)
                break
            meter.grad_rows += len(sent)
            optimizer.step()
            schedule.step()
            error = float(loss.detach().sqrt())
            bar.update(meter.calls - bar.n)
            if marks and meter.calls >= marks[0]:
                while marks and meter.calls >= marks[0]:
                    marks.pop(0)
                curve.append({**meter.spent(), "output_error": round(error, 4), **_score(delta.detach(), owner)})
    result = {"tokens": k, "contexts": CONTEXTS, "placeholder_id": placeholder, "token_ids": targets,
              "spent": meter.spent(), "output_error": round(error, 4), "checkpoints": curve, "stopped": stopped,
              **_score(delta.detach(), owner)}
    if owner is None:
        result["note"] = ("the true rows were not available to score against (a server that grants no read of "
                          f"{PORT}); run the audit in process to score the recovered geometry")
    return result


def read_rows(handle: Any, vocab: int, width: int, truth: Truth | None, budget: int, seed: int) -> dict[str, Any]:
    """Read the token-embedding table through a granted ``read`` of ``text.token_embeds``, within ``budget``.

    Each call sends rows of ``width`` ids (at most ``READ_POSITIONS`` ids in all) and asks no output.
    """
    meter = CallMeter(handle, budget)
    per_call = max(width, READ_POSITIONS // width * width)
    got, done, stopped = [], 0, None
    while meter.afford(1) and done < vocab:
        chunk = torch.arange(done, min(vocab, done + per_call))
        rows = -(-len(chunk) // width)
        block = torch.zeros(rows * width, dtype=torch.long)
        block[:len(chunk)] = chunk
        mask = (torch.arange(rows * width) < len(chunk)).long().view(rows, width)
        try:
            with torch.no_grad():
                values = handle.forward({"text.input_ids": block.view(rows, width), "text.attention_mask": mask},
                                        outputs=[], reads=[PORT])[PORT]
        except RemoteError as err:
            if err.status not in (403, 429):
                raise
            stopped = str(err)
            log.warning("reading the token table stopped after %d calls: %s", meter.calls, err)
            break
        got.append(values.reshape(rows * width, -1)[:len(chunk)])
        done += len(chunk)
    table = torch.cat(got) if got else torch.zeros(0)
    result: dict[str, Any] = {"spent": meter.spent(), "rows_read": len(table), "vocab": vocab,
                              "fraction": round(len(table) / vocab, 4),
                              "calls_for_whole_table": -(-vocab // per_call), "ids_per_call": per_call,
                              "stopped": stopped,
                              "note": f"a read grant of {PORT} returns the rows themselves: no attack is needed"}
    if truth is not None and len(table):
        sample = torch.randperm(len(table), generator=torch.Generator().manual_seed(seed))[:1000]
        result["max_abs_error"] = float((table[sample] - truth(sample)).abs().max())
    return result


Rows = tuple[Tensor, Tensor, Tensor]  # ids [K*C, L], mask [K*C, L], the free slot's position [K*C]


def _rows(handle: Any, texts: Sequence[str], tokens: int, seed: int) -> tuple[list[int], Rows, int]:
    """K target ids, ``K x CONTEXTS`` rows with a free slot after each row's first token, and a placeholder id."""
    rng = random.Random(seed)
    sample = list(texts[:400])
    tok = handle.tokenize(sample)
    ids, mask = tok["text.input_ids"], tok["text.attention_mask"]
    lengths = mask.sum(1)
    inner: Counter[int] = Counter()
    for row, length in zip(ids.tolist(), lengths.tolist()):
        inner.update(row[1:length - 1])  # not the start or end token
    common = [i for i, _ in inner.most_common(max(4 * tokens, 64))]
    if len(common) < tokens + 1:
        raise InvalidInputError(f"the pool's texts hold only {len(common)} distinct inner tokens; the geometry "
                                f"probe needs {tokens + 1}: lower --geometry-tokens")
    chosen = rng.sample(common, tokens + 1)
    targets, placeholder = chosen[:tokens], chosen[tokens]
    short = [i for i in range(len(sample)) if 4 <= int(lengths[i]) <= 12] or list(range(len(sample)))
    contexts = [ids[i, :int(lengths[i])] for i in rng.sample(short, min(CONTEXTS, len(short)))]
    while len(contexts) < CONTEXTS:
        contexts.append(contexts[-1])
    width = max(len(c) for c in contexts) + 1
    rows = torch.zeros(tokens * CONTEXTS, width, dtype=torch.long)
    masks = torch.zeros_like(rows)
    for r in range(tokens * CONTEXTS):
        ctx = contexts[r % CONTEXTS]
        rows[r, 0], rows[r, 2:len(ctx) + 1] = ctx[0], ctx[1:]
        masks[r, :len(ctx) + 1] = 1
    return targets, (rows, masks, torch.ones(tokens * CONTEXTS, dtype=torch.long)), placeholder


def _with_token(ids: Tensor, position: Tensor, token: Tensor) -> Tensor:
    out = ids.clone()
    out[torch.arange(len(ids)), position] = token
    return out


def _owner_rows(truth: Truth | None, targets: list[int], placeholder: int) -> Tensor | None:
    """``E[tₖ] − E[p]`` from the owner's table, or ``None`` when it is not available."""
    if truth is None:
        return None
    rows = truth(torch.tensor([*targets, placeholder]))
    return rows[:-1] - rows[-1:]


def _score(delta: Tensor, owner: Tensor | None) -> dict[str, float]:
    if owner is None:
        return {}
    return {"pairwise_cosine_correlation": round(_cosine_correlation(delta, owner), 4),
            "row_error": round(float(((delta - owner).norm(dim=1) / owner.norm(dim=1).clamp_min(1e-12)).mean()), 4)}


def _cosine_correlation(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of the pairwise cosines of the centred rows of ``a`` and of ``b``."""
    def cosines(x: Tensor) -> Tensor:
        x = x - x.mean(0)
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        upper = torch.triu_indices(len(x), len(x), 1)
        return (x @ x.T)[upper[0], upper[1]]

    ca, cb = cosines(a), cosines(b)
    ca, cb = ca - ca.mean(), cb - cb.mean()
    return float((ca * cb).sum() / (ca.norm() * cb.norm()).clamp_min(1e-12))
