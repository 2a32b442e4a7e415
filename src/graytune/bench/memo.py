"""``memoize``, measured side by side: epochs of a black-box output adapter on MiniLM with and without it.

256 WordNet glosses (the first of the training split), batch 32, AdamW on the output adapter's weights, a
cross-entropy on the glosses' supersense labels against the class-prompt embeddings. The memoized handle is
warmed by one untimed epoch (its first epoch, which embeds every gloss, is timed apart); then plain and
memoized epochs alternate, who goes first alternating by round.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from graytune.access import memoize, open_backbone
from graytune.data.catalog import load_splits
from graytune.model import AdaptedModel


def run(rounds: int = 3, texts: int = 256, batch: int = 32) -> dict[str, Any]:
    data = load_splits("wordnet-supersense").train
    glosses, labels = list(data.texts[:texts]), torch.as_tensor(data.labels[:texts])
    plain = open_backbone("minilm", "black-box")
    memo = memoize(open_backbone("minilm", "black-box"))
    with torch.no_grad():
        prompts = F.normalize(plain.encode_text([f"a gloss about {c}" for c in data.class_names]), dim=-1)
    models = {"plain": AdaptedModel.build(plain, "output"), "memoized": AdaptedModel.build(memo, "output")}
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for k, m in models.items()}

    def epoch(name: str) -> float:
        model, optimizer = models[name], optimizers[name]
        start = time.perf_counter()
        for i in range(0, len(glosses), batch):
            logits = 100 * F.normalize(model.encode_text(glosses[i:i + batch]), dim=-1) @ prompts.T
            loss = F.cross_entropy(logits, labels[i:i + batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    first = {"plain": epoch("plain"), "memoized": epoch("memoized")}  # the memo's first: every gloss embedded
    times: dict[str, list[float]] = {"plain": [], "memoized": []}
    for r in range(rounds):
        for name in (("plain", "memoized") if r % 2 == 0 else ("memoized", "plain")):
            times[name].append(epoch(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"texts": texts, "batch": batch, "rounds": rounds, "first_plain_s": first["plain"],
            "first_memoized_s": first["memoized"], "plain_s": med["plain"], "memoized_s": med["memoized"],
            "ratio": med["memoized"] / med["plain"], "first_ratio": first["memoized"] / first["plain"],
            "backbone_rows": {"plain": plain.exposure.forward_samples, "memoized": memo.exposure.forward_samples}}


def format_report(r: dict[str, Any]) -> str:
    rows = r["backbone_rows"]
    return (f"memoize (MiniLM black-box output adapter, {r['texts']} glosses, batch {r['batch']}): epoch "
            f"{r['plain_s']:.2f} s plain, {r['memoized_s']:.3f} s memoized, ratio {r['ratio']:.3f} "
            f"(medians of {r['rounds']} interleaved rounds); first epoch {r['first_plain_s']:.2f} s plain, "
            f"{r['first_memoized_s']:.2f} s memoized, ratio {r['first_ratio']:.3f} (keys and copies, every gloss "
            f"embedded); rows sent to the backbone: plain {rows['plain']:,}, memoized {rows['memoized']:,}")
