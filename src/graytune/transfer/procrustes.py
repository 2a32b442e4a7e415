"""The regularised orthogonal Procrustes problem, in closed form.

``argmin_{W ∈ O(D)} ‖A W − B‖² + β ‖W − I‖²`` is ``U Vᵀ`` with
``U S Vᵀ = SVD(Aᵀ B + β I)``. At β = 0 it is ``scipy.linalg.orthogonal_procrustes(A, B)``.

Example:
    >>> R = orthogonal_procrustes(H_t, H_s, beta=500.0)   # [D, D], R @ R.T == I
"""

from __future__ import annotations

import torch

from graytune.errors import InvalidInputError


def orthogonal_procrustes(a: torch.Tensor, b: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """The orthogonal ``[D, D]`` matrix closest to mapping rows of ``a`` ``[N, D]`` onto rows of ``b``."""
    if a.dim() != 2 or a.shape != b.shape:
        raise InvalidInputError(f"procrustes needs two [N, D] matrices of one shape; got {list(a.shape)} and "
                                f"{list(b.shape)}")
    if beta < 0:
        raise InvalidInputError(f"beta must be >= 0, got {beta}")
    m = a.double().T @ b.double() + beta * torch.eye(a.shape[1], dtype=torch.float64)
    u, _, vh = torch.linalg.svd(m)
    return (u @ vh).to(a.dtype)
