"""Retrieval metrics in both directions, correct with several captions per image.

Names follow CLIP_benchmark: ``image_retrieval_recall@k`` is text→image (for
each caption, is its image among the top k images); ``text_retrieval_recall@k``
is image→text (for each image, is any of its captions among the top k texts).

Example:
    >>> m = retrieval_metrics(image_emb, text_emb, caption_image=[0, 0, 1])
    >>> m["text_retrieval_recall@1"]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from graytune.errors import InvalidInputError

Tensor = torch.Tensor


def retrieval_metrics(
    image_emb: Tensor, text_emb: Tensor, caption_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k both ways (0–1, as CLIP_benchmark), their mean, and median ranks (1 = first).

    Args:
        image_emb: ``[N, E]`` image embeddings (normalised here).
        text_emb: ``[M, E]`` caption embeddings (normalised here).
        caption_image: length M; the index of each caption's image.
        ks: the k of each recall.
    """
    index = torch.as_tensor(list(caption_image), dtype=torch.long)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if index.numel() != n_txt or (n_txt and (int(index.min()) < 0 or int(index.max()) >= n_img)):
        raise InvalidInputError(f"caption_image must give, for each of the {n_txt} captions, an image index "
                                f"in [0, {n_img}); got {index.numel()} entries")
    sim = F.normalize(text_emb.float(), dim=-1) @ F.normalize(image_emb.float(), dim=-1).T  # [M, N]
    # text→image: rank of the right image among all images, per caption
    right = sim.gather(1, index.unsqueeze(1))  # [M, 1]
    t2i_rank = (sim > right).sum(1) + 1  # [M]
    # image→text: best rank among the image's captions, per image
    sim_i = sim.T  # [N, M]
    owns = F.one_hot(index, n_img).T.bool()  # [N, M]
    best_own = sim_i.masked_fill(~owns, float("-inf")).max(1).values  # [N]
    i2t_rank = ((sim_i > best_own.unsqueeze(1)).sum(1) + 1)[owns.any(1)]  # [N'] images with a caption
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float((t2i_rank <= k).float().mean())
        out[f"text_retrieval_recall@{k}"] = float((i2t_rank <= k).float().mean())
    out["mean_recall"] = sum(v for key, v in out.items() if "recall@" in key) / (2 * len(ks))
    out["image_retrieval_median_rank"] = float(t2i_rank.float().median())
    out["text_retrieval_median_rank"] = float(i2t_rank.float().median())
    return out


def category_metrics(query_emb: Tensor, gallery_emb: Tensor, query_labels: Sequence[int],
                     gallery_labels: Sequence[int], ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Category-level retrieval (sketch → image): mean average precision and precision@k, 0–1.

    A gallery item is relevant to a query when their labels match. Queries with
    no relevant item are left out of the means.
    """
    q = torch.as_tensor(list(query_labels))
    g = torch.as_tensor(list(gallery_labels))
    if len(q) != len(query_emb) or len(g) != len(gallery_emb):
        raise InvalidInputError(f"labels ({len(q)}, {len(g)}) must match the embeddings ({len(query_emb)}, "
                                f"{len(gallery_emb)})")
    sim = F.normalize(query_emb.float(), dim=-1) @ F.normalize(gallery_emb.float(), dim=-1).T  # [Q, G]
    order = sim.argsort(dim=1, descending=True, stable=True)
    relevant = (g[order] == q.unsqueeze(1)).float()  # [Q, G] in ranked order
    has = relevant.sum(1) > 0
    relevant = relevant[has]
    ranks = torch.arange(1, relevant.shape[1] + 1).float()
    precision_at = relevant.cumsum(1) / ranks  # [Q', G]
    ap = (precision_at * relevant).sum(1) / relevant.sum(1)
    out = {"mAP": float(ap.mean())}
    for k in ks:
        out[f"P@{k}"] = float(relevant[:, :k].sum(1).div(min(k, relevant.shape[1])).mean())
    return out
