"""Singular value decompositions of a module's weight change, without forming it when it is low rank
(spec: ALGORITHMS.md 16).

For ΔW = up @ down with rank r, thin QR of `up` (out × r) and `downᵀ` (in·K × r) gives
up @ down = Q_u (R_u R_dᵀ) Q_dᵀ; the SVD of the r × r core R_u R_dᵀ = U_c Σ V_cᵀ gives the
singular values, and U = Q_u U_c, V = Q_d V_c the singular vectors. Cost O((out + in·K)·r²)
instead of O(out·in·K·min(out, in·K)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Spectrum:
    """An SVD M = U diag(S) Vh kept in factored form: U = left_basis @ left_core and
    Vh = right_core @ right_basis (a core of None stands for the identity), so that the leading
    `k` singular vectors cost O((m + n)·r·k) to form, not O((m + n)·r²)."""

    S: torch.Tensor
    left_basis: torch.Tensor  # (m, p)
    right_basis: torch.Tensor  # (q, n)
    left_core: torch.Tensor | None = None  # (p, k)
    right_core: torch.Tensor | None = None  # (k, q)

    @property
    def full_length(self) -> int:
        """min(m, n): the length of the spectrum a dense SVD of M would return."""
        return min(self.left_basis.shape[0], self.right_basis.shape[1])

    def left(self, rank: int) -> torch.Tensor:
        """Return U[:, :rank]."""
        if self.left_core is None:
            return self.left_basis[:, :rank]
        return self.left_basis @ self.left_core[:, :rank]

    def right(self, rank: int) -> torch.Tensor:
        """Return Vh[:rank]."""
        if self.right_core is None:
            return self.right_basis[:rank]
        return self.right_core[:rank] @ self.right_basis

    @property
    def U(self) -> torch.Tensor:
        return self.left(self.S.numel())

    @property
    def Vh(self) -> torch.Tensor:
        return self.right(self.S.numel())


def tucker_to_flat_down(mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Return the (r, in·K) down factor equivalent to `lora_mid` (r, r, *k) followed by `lora_down` (r, in[, 1, 1]).

    ΔW[o, c, h, w] = Σ_ij up[o, i] mid[i, j, h, w] down[j, c], so the flat (out, in·K) matrix is
    up @ D with D[i, (c, h, w)] = Σ_j mid[i, j, h, w] down[j, c]; the core stays r × r.
    """
    rank = mid.shape[0]
    down_flat = down.reshape(down.shape[0], -1)
    contracted = torch.einsum("ij...,jc->ic...", mid, down_flat)
    return contracted.reshape(rank, -1)


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> Spectrum:
    """Return the SVD of up @ down (up (m, r), down (r, n)) through the r × r core, never forming it."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.transpose(0, 1))
    core = r_up @ r_down.transpose(0, 1)
    u_core, sigma, vh_core = torch.linalg.svd(core, full_matrices=False)
    return Spectrum(sigma, q_up, q_down.transpose(0, 1), u_core, vh_core)


def svd_of_dense(matrix: torch.Tensor) -> Spectrum:
    """Return the thin SVD of a dense matrix (exact: the dynamic methods need the whole spectrum)."""
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    return Spectrum(sigma, u, vh)


def svd_leading(matrix: torch.Tensor, rank: int, oversample: int = 10, iterations: int = 4) -> Spectrum:
    """Return the leading singular triplets of a dense matrix, at least `rank` of them, by a randomized range
    finder with power iterations (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1).

    Cost O(m·n·(rank + oversample)·(2·iterations + 2)) instead of a full SVD's O(m·n·min(m, n)); the
    approximation U_r Σ_r V_rᵀ is the projection of the matrix on the span of U_r, so its error is exactly
    sqrt(‖M‖_F² − Σ_{i≤r} σ_i²). The random start is seeded: the same matrix gives the same factors.
    Callers take the exact `svd_of_dense` when rank + oversample reaches min(m, n).
    """
    rows, cols = matrix.shape
    width = min(rank + oversample, rows, cols)
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    probe = torch.randn(cols, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis, _ = torch.linalg.qr(matrix @ probe)
    for _ in range(iterations):  # each pass sharpens the basis towards the leading singular vectors
        back, _ = torch.linalg.qr(matrix.transpose(0, 1) @ basis)
        basis, _ = torch.linalg.qr(matrix @ back)
    core = basis.transpose(0, 1) @ matrix  # (width, cols): the matrix seen from the basis
    u_core, sigma, vh = torch.linalg.svd(core, full_matrices=False)
    return Spectrum(sigma, basis, vh, left_core=u_core)


def truncated_factors(spectrum: Spectrum, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (up, down) = (U_r Σ_r, V_rᵀ): kohya's split of the best rank-`rank` approximation."""
    up = spectrum.left(rank) * spectrum.S[:rank]
    down = spectrum.right(rank)
    return up, down
