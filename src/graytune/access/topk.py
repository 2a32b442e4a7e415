"""Top-k log-probabilities of a language model: the owner's grant, and each request's checks.

Full-vocabulary logits never cross the boundary (their size, and what they leak: a whole next-token
distribution per position, V values, from which the LM head can be learnt). What may cross, where the
owner grants it, is the ``k`` most likely next tokens and their log-probabilities at each position of a
forward: ``text.top_ids`` ``[B, L, k]`` and ``text.top_logprobs`` ``[B, L, k]``, beside
``text.target_logprobs``. The owner grants at most ``K`` (``open_backbone(..., top_k=K)``, ``graytune serve
--grant-topk K``; ``K <= MAX_TOP_K``) and a client asks ``k <= K`` per forward (``forward(..., top_k=k)``).
The exposure record counts what came back: positions x k values (``Exposure.top_k``).

Example:
    >>> h = graytune.open_backbone("smollm2-135m", "black-box", top_k=5)          # the owner grants 5
    >>> out = h.forward({"text": ["The capital of France is"]}, outputs=[], top_k=3)
    >>> out["text.top_ids"].shape, out["text.top_logprobs"].shape                  # [1, L, 3] each
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from graytune.errors import AccessDeniedError, InvalidInputError
from graytune.types import MAX_TOP_K, TOP_IDS, TOP_LOGPROBS, BackboneSpec, Exposure, Op

__all__ = ["TOP_K_NAMES", "check_top_k_grant", "plan_top_k", "remote_top_k_grant", "top_k_refused"]
Tensor = torch.Tensor
#: what a top-k read returns, in this order
TOP_K_NAMES = (TOP_IDS, TOP_LOGPROBS)
_WHAT = "top-k log-probabilities"


def check_top_k_grant(spec: BackboneSpec, granted: object) -> int:
    """The top-k an owner grants on ``spec``'s backbone as a whole number; a clear error for anything else."""
    if isinstance(granted, bool) or not isinstance(granted, int) or not 0 <= granted <= MAX_TOP_K:
        raise InvalidInputError(f"a top-k grant of {granted!r} was given; grant a whole number from 0 (none) to "
                                f"{MAX_TOP_K} (top_k=K, graytune serve --grant-topk K): each position then reveals "
                                "K values of the model's next-token distribution")
    if granted and TOP_LOGPROBS not in spec.port_names():
        raise InvalidInputError(f"top_k={granted} was granted on {spec.id}, which has no next-token distribution "
                                f"({TOP_LOGPROBS}); top-k grants apply to language models (hf-causal:, smollm2-135m, "
                                "qwen2.5-0.5b): leave top_k out")
    return granted


def top_k_refused(asked: int, granted: int, where: str = "this handle") -> AccessDeniedError:
    """The refusal of a forward asking ``top_k=asked`` where the owner grants ``granted`` (403 from a server)."""
    needed = f"an owner's top-k grant of at least {asked}"
    held = f"a top-k grant of {granted}" if granted else "no top-k grant"
    more = f"ask for top_k <= {granted}, or " if granted else ""
    return AccessDeniedError(_WHAT, needed, held, message=(
        f"top_k={asked} was asked; {where} holds {held} ({_WHAT} reveal k values of the next-token distribution "
        f"per position, so the owner grants them, at most {MAX_TOP_K}); {more}ask the owner to grant more "
        f"(open_backbone(..., top_k={asked}), graytune serve --grant-topk {asked})"))


def remote_top_k_grant(asked: object, server_grant: int, url: str) -> int:
    """The top-k a client opening ``url`` with ``top_k=asked`` holds; refused above the server's grant."""
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 0:
        raise InvalidInputError(f"top_k={asked!r}: give the whole number of next tokens you will ask for (0: none)")
    if asked > server_grant:
        raise top_k_refused(asked, server_grant, f"{url}")
    return asked


def plan_top_k(spec: BackboneSpec, granted: int, asked: object, inputs: Mapping[str, Tensor],
               reads: Sequence[str], exposure: Exposure) -> list[str]:
    """The names a forward asking ``top_k=asked`` reads (none for 0), after every check; noted in ``exposure``.

    Raises:
        InvalidInputError: ``asked`` is not a whole number >= 0, the backbone is no language model, ``asked``
            exceeds its vocabulary, or ``reads`` names a top-k output (ask it with ``top_k=`` instead).
        AccessDeniedError: ``asked`` above the owner's grant ``granted`` (no grant: 0).
    """
    listed = [name for name in reads if name in TOP_K_NAMES]
    if listed:
        raise InvalidInputError(f"reads={listed}: the most likely next tokens are asked with top_k=k (e.g. "
                                f"forward(..., top_k=5)), which returns {' and '.join(TOP_K_NAMES)}")
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 0:
        raise InvalidInputError(f"top_k={asked!r}: ask a whole number of next tokens per position, from 1 to the "
                                "owner's grant (0 or leave it out: none)")
    if not asked:
        return []
    if TOP_LOGPROBS not in spec.port_names():
        raise InvalidInputError(f"top_k={asked}: {spec.id} has no next-token distribution ({TOP_LOGPROBS}); "
                                "top-k applies to language models; leave top_k out")
    if asked > granted:
        raise top_k_refused(asked, granted)
    if "text.input_ids" not in inputs:
        raise InvalidInputError(f"top_k={asked}: the next tokens follow text; send text or text.input_ids")
    vocab = int(spec.preprocess.get("text", {}).get("vocab_size", asked))
    if asked > vocab:
        raise InvalidInputError(f"top_k={asked} exceeds {spec.id}'s vocabulary of {vocab} tokens; ask at most {vocab}")
    mask = inputs.get("text.attention_mask")
    positions = int(mask.sum()) if mask is not None else int(inputs["text.input_ids"].numel())
    for name in TOP_K_NAMES:
        exposure.note(spec.port(name), Op.READ)
    exposure.note_top_k(positions, asked)
    return list(TOP_K_NAMES)
