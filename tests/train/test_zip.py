"""``--zo zip`` as ZIP (Park et al., ICLR 2025, ``trainers/zip.py``) defines it: the low-rank, feature-shared
reparametrisation, its segmented-uniform directions, its ε schedule and its √n clip."""

from __future__ import annotations

import math

import pytest
import torch

from graytune import InvalidInputError
from graytune.train.checkpoint import GRADIENT_SOURCE
from graytune.train.tasks import ClassificationTask
from graytune.train.trainer import TrainConfig, fit
from graytune.train.zeroth import IntrinsicSpace, ZerothOrder, ZOSettings, fastfood
from tests.train.test_trainer import toy_texts
from tests.train.test_zeroth import assert_matches, average_estimate, one_thread, zo_model  # noqa: F401


def zip_of(*shapes: tuple[int, ...], dim: int = 500, seed: int = 0) -> ZerothOrder:
    params = {f"t{i}": torch.nn.Parameter(torch.zeros(s), requires_grad=False) for i, s in enumerate(shapes)}
    return ZerothOrder(params, ZOSettings.resolve("zip", dim=dim), seed=seed)


def zips_count(rows: int, dim: int, rank: int = 5) -> int:
    """ZIP's number of optimisation variables: U [rows, r], s [r], V [k/rows, r], shared_V [k/rows]."""
    per_row = dim // rows
    return rows * rank + rank + per_row * rank + per_row


def test_the_variables_are_as_many_as_zips_formula_gives() -> None:
    assert zip_of((1, 8, 512)).w.numel() == zips_count(8, 500) == 417  # ZIP's setting: 8 CLIP tokens, k 500
    assert zip_of((1, 4, 384)).w.numel() == zips_count(4, 500) == 4 * 5 + 5 + 125 * 5 + 125
    # dga-zo: the text shift and extra token (a row each), the pixel conv's weight and bias (a row each)
    zo = zip_of((1, 1, 384), (1, 1, 384), (3, 3, 3, 3), (3,), dim=256)
    assert zo.space.widths == [384, 384, 81, 3] and zo.w.numel() == zips_count(4, 256)
    assert zo.variables() == {"zeroth_order.w": zo.w}
    with pytest.raises(InvalidInputError, match="zo_dim=3 is below the 4 rows"):
        zip_of((1, 4, 8), dim=3)


def test_the_offset_starts_at_zero_and_v_is_shared_by_every_row() -> None:
    theta0 = torch.randn(1, 3, 8)
    p = torch.nn.Parameter(theta0.clone(), requires_grad=False)
    zo = ZerothOrder({"p": p}, ZOSettings("zip", q=1, eps=0.01, dim=12, rank=2, eps_decay=0.1))
    zo.after_step()
    torch.testing.assert_close(p.detach(), theta0)  # U = 0, shared_v = 0: θ = θ₀ at the start
    space, w = zo.space, zo.w.detach().clone()
    rows, r, m = 3, 2, 4
    w[rows * r + r + m * r:] = 1.0  # shared_v alone: every row moves
    assert all(float(row.norm()) > 0 for row in space.offset(w).view(3, 8))
    w = zo.space.initial.clone()
    w[2 * r:2 * r + r] = torch.tensor([0.5, -1.0])  # U's last row alone: only the last row moves
    moved = space.offset(w).view(3, 8)
    assert float(moved[:2].abs().max()) == 0.0 and float(moved[2].norm()) > 0


def test_the_estimate_is_the_gradient_in_the_low_rank_space(one_thread) -> None:  # type: ignore[no-untyped-def]
    """A quadratic in θ, reparametrised: the mean estimate over many directions approaches the exact gradient with
    respect to w (autograd through the reparametrisation), within 12 % of its norm (the noise falls as 1/√draws;
    about 6 % is expected at 6,000 directions of 20 variables)."""
    g = torch.Generator().manual_seed(0)
    d = 24
    root = torch.randn(d, d, generator=g)
    a, b = root @ root.T / d + torch.eye(d), torch.randn(d, generator=g)
    theta0 = torch.randn(1, 3, 8, generator=g)
    p = torch.nn.Parameter(theta0.clone(), requires_grad=False)
    zo = ZerothOrder({"p": p}, ZOSettings("zip", q=20, eps=1e-3, dim=12, rank=2, eps_decay=0.1), seed=1)
    with torch.no_grad():
        zo.w.add_(0.5 * torch.randn(zo.w.shape, generator=g))  # away from the start: every part has a gradient
    zo.after_step()

    def quadratic(theta: torch.Tensor) -> torch.Tensor:  # θ flat [24]
        return 0.5 * theta @ a @ theta + b @ theta

    truth = torch.func.grad(lambda w: quadratic(theta0.reshape(-1) + zo.space.offset(w)))(zo.w.detach())
    assert zo.w.numel() == 20 and float(truth.abs().min()) > 0
    estimate = average_estimate(zo, lambda: quadratic(p.detach().reshape(-1)), draws=300)  # the loss at θ as it is
    assert_matches(estimate, truth, tolerance=0.12)
    assert torch.nn.functional.cosine_similarity(estimate, truth, dim=0) > 0.99


def test_directions_are_segmented_uniform_and_eps_decays_as_zips() -> None:
    zo = zip_of((1, 8, 512))
    v = zo.direction(step=0, part=0, i=0)
    assert v.shape == (417,) and float(v.abs().min()) >= 0.5 and float(v.abs().max()) <= 1.0
    assert 0.3 < float((v > 0).float().mean()) < 0.7 and abs(float(v.abs().mean()) - 0.75) < 0.05
    assert torch.equal(v, zo.direction(0, 0, 0)) and not torch.equal(v, zo.direction(1, 0, 0))
    settings = zo.settings
    assert settings.eps_at(0) == 0.01 and math.isclose(settings.eps_at(9), 0.01 / 10**0.1)  # c_k = c / k^0.1
    assert ZOSettings.resolve("spsa").eps_at(9) == 0.01  # the others keep a fixed ε


def test_the_estimate_is_clipped_to_the_root_of_the_variable_count() -> None:
    zo = zip_of((1, 8, 512))
    zo.pending = torch.full((417,), 10.0)
    zo.write_grads()
    assert math.isclose(float(zo.w.grad.norm()), math.sqrt(417), rel_tol=1e-6)
    small = torch.full((417,), 0.01)
    zo.pending = small.clone()
    zo.write_grads()
    torch.testing.assert_close(zo.w.grad, small)


def test_fastfood_is_h_g_pi_h_b_and_keeps_norms() -> None:
    width, dim, seed = 24, 5, 7
    m = fastfood(width, dim, seed)
    g = torch.Generator().manual_seed(seed)  # the draws, in fastfood's order: B, Π, G
    size = 32
    b = torch.randint(0, 2, (size,), generator=g).float() * 2 - 1
    pi, gauss = torch.randperm(size, generator=g), torch.randn(size, generator=g)

    def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:  # unnormalised, by halves
        if len(x) == 1:
            return x
        top, bottom = walsh_hadamard(x[:len(x) // 2]), walsh_hadamard(x[len(x) // 2:])
        return torch.cat([top + bottom, top - bottom])

    x = torch.randn(dim, generator=g)
    padded = torch.cat([x, torch.zeros(size - dim)])
    y = walsh_hadamard(gauss * walsh_hadamard(b * padded)[pi])[:width]
    reference = y / (math.sqrt(size * float(gauss.pow(2).sum())) * math.sqrt(width / size))
    torch.testing.assert_close(m @ x, reference, atol=1e-5, rtol=1e-5)
    many = torch.randn(62, 2000, generator=g)  # ZIP's shape (62 intrinsic numbers a row, 512 wide): norms kept
    ratio = (fastfood(512, 62, 0) @ many).norm(dim=0) / many.norm(dim=0)
    assert abs(float(ratio.mean()) - 1) < 0.1
    assert IntrinsicSpace([torch.Size([1, 2, 24])], dim=10, rank=5).maps[0].shape == (24, 5)


def test_a_checkpoint_of_the_earlier_dense_zip_is_refused_clearly(  # type: ignore[no-untyped-def]
        tiny_clip_dir, tmp_path) -> None:
    config = TrainConfig(lr=1e-2, batch_size=4, max_steps=2, eval_every=2, zo="zip", zo_q=1, zo_dim=8)
    ckpt = tmp_path / "checkpoint.pt"
    fit(zo_model(tiny_clip_dir), ClassificationTask(toy_texts(), "a {}"), toy_texts(8, seed=1), config,
        checkpoint=ckpt, progress=False)
    payload = torch.load(ckpt, weights_only=True)
    theta0 = payload[GRADIENT_SOURCE]["theta0"]
    payload[GRADIENT_SOURCE] = {"momentum": None, "z": torch.zeros(8), "theta0": theta0}  # what it held before
    torch.save(payload, ckpt)
    with pytest.raises(InvalidInputError, match="written by graytune's earlier zip .*delete the checkpoint"):
        fit(zo_model(tiny_clip_dir), ClassificationTask(toy_texts(), "a {}"), toy_texts(8, seed=1), config,
            checkpoint=ckpt, progress=False)
