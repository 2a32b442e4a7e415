"""The linear probe both sides are scored with: multinomial logistic regression on standardised features.

The same fit (full-batch L-BFGS, a small L2 penalty, fixed iterations) is applied to the backbone's
features and the surrogate's, so their accuracies compare like for like.

Example:
    >>> predictions = linear_probe(train_x, train_y, test_x, classes=10)   # [N_test] class ids
    >>> float((predictions == test_y).float().mean())
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, classes: int, l2: float = 1e-3,
                 iterations: int = 100) -> Tensor:
    """Class predictions ``[N_test]`` of a logistic regression fitted on ``train_x [N, F]``, ``train_y [N]``."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x, test = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(x @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)  # type: ignore[arg-type]
    with torch.no_grad():
        return (test @ weight + bias).argmax(1)


def accuracy(predictions: Tensor, labels: Tensor) -> float:
    return float((predictions == labels).float().mean())
