"""EFT, the emulated fine-tuning baseline TransMiter compares with (Mitchell et al., ICLR 2024).

Logit arithmetic with the weak pair: the strong model's zero-shot scores plus what fine-tuning
changed on the weak one, ``z_strong + α (z_weak_ft − z_weak)``. Nothing is trained, but every
query runs through three models (TransMiter's Table 5 counts that as its inference cost). On
class scores a per-row constant does not move the argmax, so the sum of log-probabilities the
paper writes and this sum of logits classify alike, over all classes or over any class subset
(base or novel).

Example:
    >>> scores = eft_predict(strong, weak_ft, weak, test_texts, names, "a definition of a {}")   # [N, C]
    >>> eft_scores(strong_zs, weak_ft_scores, weak_zs)      # the same from scores already computed
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graytune.errors import InvalidInputError
from graytune.transfer.transmiter import Encoder, Queries, class_scores

Tensor = torch.Tensor


def eft_scores(strong_zero_shot: Tensor, weak_fine_tuned: Tensor, weak_zero_shot: Tensor, alpha: float = 1.0
               ) -> Tensor:
    """``[N, C]`` EFT scores: ``strong_zero_shot + alpha · (weak_fine_tuned − weak_zero_shot)``.

    The three are ``[N, C]`` scores of the same queries over the same classes in the same order
    (``class_scores``: 100 × cosine); ``alpha`` scales the fine-tuning delta (1: the paper's EFT).

    Raises:
        InvalidInputError: the three shapes differ.
    """
    shapes = [list(t.shape) for t in (strong_zero_shot, weak_fine_tuned, weak_zero_shot)]
    if not (shapes[0] == shapes[1] == shapes[2]) or len(shapes[0]) != 2:
        raise InvalidInputError(f"EFT needs three [N, C] scores of the same queries over the same classes (strong "
                                f"zero-shot, weak fine-tuned, weak zero-shot); got {shapes}")
    return strong_zero_shot + alpha * (weak_fine_tuned - weak_zero_shot)


@torch.no_grad()
def eft_predict(strong: Encoder, weak_fine_tuned: Encoder, weak: Encoder, queries: Queries, names: Sequence[str],
                prompt: str, alpha: float = 1.0, batch_size: int = 128, progress: bool = False) -> Tensor:
    """``[N, C]`` EFT scores of images (``[N, 3, H, W]``) or texts over the class ``names``.

    Each encoder scores the queries itself (forward only, black-box); ``weak_fine_tuned`` is the weak
    backbone with its adapters (e.g. an ``AdaptedModel``), ``weak`` the same backbone without.
    """
    scored = [class_scores(encoder, queries, names, prompt, batch_size, progress=progress, desc=desc)
              for encoder, desc in ((strong, "EFT strong"), (weak_fine_tuned, "EFT weak ft"), (weak, "EFT weak"))]
    return eft_scores(*scored, alpha=alpha)
