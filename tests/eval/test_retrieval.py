"""Retrieval metrics agree with a naive loop, several captions per image included."""

from __future__ import annotations

import pytest
import torch

from graytune import InvalidInputError
from graytune.eval.retrieval import retrieval_metrics


def naive(image_emb, text_emb, caption_image, k):  # type: ignore[no-untyped-def]
    img = torch.nn.functional.normalize(image_emb, dim=-1)
    txt = torch.nn.functional.normalize(text_emb, dim=-1)
    t2i_hits, i2t_hits = 0, 0
    for j in range(len(txt)):
        order = sorted(range(len(img)), key=lambda i: -float(txt[j] @ img[i]))
        t2i_hits += caption_image[j] in order[:k]
    with_caps = sorted(set(caption_image))
    for i in with_caps:
        order = sorted(range(len(txt)), key=lambda j: -float(txt[j] @ img[i]))
        i2t_hits += any(caption_image[j] == i for j in order[:k])
    return t2i_hits / len(txt), i2t_hits / len(with_caps)  # 0–1, as CLIP_benchmark


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_reference_with_multi_captions(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_img = 12
    caption_image = [i for i in range(n_img) for _ in range(1 + i % 3)]  # 1 to 3 captions each
    image_emb = torch.randn(n_img, 8, generator=g)
    text_emb = image_emb[caption_image] + 1.2 * torch.randn(len(caption_image), 8, generator=g)
    m = retrieval_metrics(image_emb, text_emb, caption_image, ks=(1, 3, 5))
    for k in (1, 3, 5):
        t2i, i2t = naive(image_emb, text_emb, caption_image, k)
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)


def test_perfect_embeddings_score_1_and_rank_1() -> None:
    emb = torch.eye(5)
    m = retrieval_metrics(emb, emb, list(range(5)))
    assert m["image_retrieval_recall@1"] == m["text_retrieval_recall@1"] == 1.0
    assert m["image_retrieval_median_rank"] == m["text_retrieval_median_rank"] == 1.0


def test_bad_caption_index_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="for each of the 3 captions"):
        retrieval_metrics(torch.eye(2), torch.eye(3)[:, :2], [0, 1, 5])


def naive_ap(scores: list[float], rel: list[bool]) -> float:
    ranked = [r for _, r in sorted(zip(scores, rel), key=lambda t: -t[0])]
    hits, total = 0, 0.0
    for i, r in enumerate(ranked, 1):
        if r:
            hits += 1
            total += hits / i
    return total / hits


@pytest.mark.parametrize("seed", [0, 1])
def test_category_metrics_match_naive_map_and_precision(seed: int) -> None:
    from graytune.eval.retrieval import category_metrics

    g = torch.Generator().manual_seed(seed)
    q_lab, g_lab = torch.randint(0, 3, (7,), generator=g).tolist(), torch.randint(0, 3, (15,), generator=g).tolist()
    q, gal = torch.randn(7, 5, generator=g), torch.randn(15, 5, generator=g)
    m = category_metrics(q, gal, q_lab, g_lab, ks=(1, 5))
    sims = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(gal, dim=-1).T
    aps, p5 = [], []
    for i in range(7):
        rel = [gl == q_lab[i] for gl in g_lab]
        if any(rel):
            aps.append(naive_ap(sims[i].tolist(), rel))
            top = sorted(range(15), key=lambda j: -float(sims[i, j]))[:5]
            p5.append(sum(rel[j] for j in top) / 5)
    assert m["mAP"] == pytest.approx(sum(aps) / len(aps))
    assert m["P@5"] == pytest.approx(sum(p5) / len(p5))
