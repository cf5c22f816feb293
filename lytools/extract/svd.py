"""Low-rank factorizations of one difference matrix: exact spectrum, randomized range finder.

Every route returns the same thing, a `LowRank`: an orthonormal basis on one side and the
projection of the matrix onto it, so that `up @ down` is an orthogonal projection of `M` and its
squared Frobenius error is exactly `‖M‖² − ‖projection‖²` (ALGORITHMS.md §15).

Routes
- `exact_spectrum(M)`: all singular values and the singular vectors of the smaller side, from
  the eigendecomposition of the smaller Gram matrix in float64. For the wide and tall matrices of
  a diffusion model (convs are `(out, in·k·k)`) this is several times faster than a full SVD and
  its singular values agree with `torch.linalg.svdvals` to float32 precision (float64 Gram:
  absolute error ~1e-8·σ₁ on σ).
- `randomized(M, r)`: range finder with oversampling and power iterations (Halko, Martinsson,
  Tropp 2011), for fixed ranks far below `min(M.shape)`. Its error is known exactly (it is a
  projection); how far it is from the optimum is estimated by extrapolating the energy each
  power iteration captured (`missed_energy`). `fixed_rank` keeps the result only when even
  2.5x that estimate leaves the error within 1% of the exact truncation's, else it takes the
  exact route (slowly decaying spectra, e.g. pure Gaussian noise beyond the rank).
- Every decomposition is retried (float64, another driver on CUDA, a tiny jitter, a full SVD
  when every eigensolver failed); `SvdFailure` only when every try failed (non-finite input).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# oversampling and power iterations of the range finder (Halko et al. recommend p >= 5..10, q 1..3)
OVERSAMPLING = 16
POWER_ITERATIONS = 3
MIN_POWER_ITERATIONS = 3  # the first step mixes fast (signal) and slow (noise) convergence: no earlier exit
# the randomized route is only worth it when the sketch is well below the smaller dimension
RANDOMIZED_MAX_FRACTION = 0.25
# acceptance test of a randomized result: estimated error within this factor of the exact one
ERROR_TOLERANCE = 1.01
# the missed-energy extrapolation is trusted times this (tests/test_extract_svd.py measures it on
# power-law, exponential, low-rank + Gaussian noise and flat spectra)
MISSED_ENERGY_SAFETY = 2.5
RATIO_CAP = 0.95
FLOAT32_ENERGY_NOISE = 4e-7


class SvdFailure(RuntimeError):
    """No route could decompose the matrix (it holds NaN/inf, or LAPACK failed on every try)."""


@dataclass
class LowRank:
    """`M ≈ up @ down` as an orthogonal projection of M onto a rank-`rank` basis.

    basis: orthonormal columns, `(m, r)` on the left side (`down = basisᵀ M`) or `(n, r)` on the
    right side (`up = M basis`). projected: the other factor. sigma: the singular values known
    (all of them for exact routes, the sketch's for randomized ones), descending, float64.
    """

    basis: torch.Tensor
    projected: torch.Tensor
    side: str  # "left" | "right"
    sigma: torch.Tensor
    total_energy: float  # ‖M‖²_F
    route: str
    exact_spectrum: bool
    retries: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @property
    def captured_energy(self) -> float:
        """‖up @ down‖²_F (float64)."""
        return energy(self.projected)

    @property
    def error_energy(self) -> float:
        """‖M − up @ down‖²_F, exact for a projection (clamped at 0 against rounding)."""
        return max(0.0, self.total_energy - self.captured_energy)

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (up (m, r), down (r, n)) with the singular values split evenly (√σ each side).

        The split keeps `up @ down` unchanged and both factors of similar magnitude, which is
        what survives a cast to fp16 best. Component norms of the projection are the σ_i.
        """
        if self.side == "left":
            norms = self.projected.double().norm(dim=1)
            root = torch.where(norms > 0, norms.sqrt(), torch.ones_like(norms))
            up = self.basis.double() * root
            down = self.projected.double() / root[:, None]
        else:
            norms = self.projected.double().norm(dim=0)
            root = torch.where(norms > 0, norms.sqrt(), torch.ones_like(norms))
            up = self.projected.double() / root
            down = self.basis.double().T * root[:, None]
        return up.to(dtype).contiguous(), down.to(dtype).contiguous()


# -- robust primitives --------------------------------------------------------------------------
SMALL_PROBLEM = 512 * 512  # elements: below this, LAPACK runs faster on one thread


@contextmanager
def _one_thread_if_small(matrix: torch.Tensor):
    """Run small CPU LAPACK calls on one thread: MKL's threaded eigh/SVD of a 48x48 matrix spin-waits
    (measured 6 ms with 2 threads against 0.3 ms with one), and extraction makes thousands."""
    threads = torch.get_num_threads()
    if matrix.is_cuda or threads == 1 or matrix.numel() > SMALL_PROBLEM:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _jitter(matrix: torch.Tensor) -> torch.Tensor:
    scale = float(matrix.abs().max()) if matrix.numel() else 0.0
    generator = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(matrix.shape, generator=generator, dtype=matrix.dtype).to(matrix.device)
    return matrix + noise * (scale * 1e-10 + 1e-30)


def robust_eigh(gram: torch.Tensor, retries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return eigh(gram) in float64, retrying with a tiny symmetric jitter; SvdFailure at the end."""
    if not bool(torch.isfinite(gram).all()):
        raise SvdFailure("the matrix holds NaN or infinite values")
    attempts = [("eigh", lambda: _small(torch.linalg.eigh, gram))]
    if gram.is_cuda:
        attempts.append(("eigh on cpu", lambda: tuple(t.to(gram.device) for t in torch.linalg.eigh(gram.cpu()))))
    attempts.append(("eigh with jitter", lambda: torch.linalg.eigh(_symmetric(_jitter(gram)))))
    return _first_success(attempts, retries)


def robust_svd(matrix: torch.Tensor, retries: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the thin SVD (U, S, Vh), retrying other drivers, float64 and a jitter."""
    if not bool(torch.isfinite(matrix).all()):
        raise SvdFailure("the matrix holds NaN or infinite values")
    attempts = [("svd", lambda: _small(torch.linalg.svd, matrix, full_matrices=False))]
    if matrix.is_cuda:
        attempts.append(("svd gesvd", lambda: torch.linalg.svd(matrix, full_matrices=False, driver="gesvd")))
    if matrix.dtype != torch.float64:
        attempts.append(("svd float64", lambda: _cast3(torch.linalg.svd(matrix.double(), full_matrices=False), matrix.dtype)))
    attempts.append(("svd float64 with jitter",
                     lambda: _cast3(torch.linalg.svd(_jitter(matrix.double()), full_matrices=False), matrix.dtype)))
    return _first_success(attempts, retries)


def _small(function, matrix: torch.Tensor, **kwargs):
    with _one_thread_if_small(matrix):
        return function(matrix, **kwargs)


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.T) * 0.5


def _cast3(result, dtype):
    return tuple(t.to(dtype) for t in result)


def _first_success(attempts, retries: list[str]):
    last: Exception | None = None
    for index, (name, attempt) in enumerate(attempts):
        try:
            result = attempt()
        except (RuntimeError, torch.linalg.LinAlgError) as exc:  # LinAlgError subclasses RuntimeError
            last = exc
            if index + 1 < len(attempts):
                retries.append(f"{name} failed ({str(exc).splitlines()[0][:80]}); retried")
            continue
        if all(bool(torch.isfinite(t).all()) for t in result):
            return result
        last = SvdFailure(f"{name} returned non-finite values")
        if index + 1 < len(attempts):
            retries.append(f"{name} returned non-finite values; retried")
    raise SvdFailure(f"every decomposition failed: {last}")


def _orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    """Q of the thin QR of `matrix` (Householder; in the matrix's dtype and device)."""
    q, _ = torch.linalg.qr(matrix)
    return q


def _orthonormal_fast(matrix: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of `matrix`'s columns by Cholesky QR in float64, in the matrix's dtype."""
    tall = matrix.double()
    return _cholesky_orthonormal(tall, tall.T @ tall).to(matrix.dtype)


# -- exact route -------------------------------------------------------------------------------
@dataclass
class Spectrum:
    """All singular values of M (float64, descending) and the singular vectors of its smaller side."""

    sigma: torch.Tensor
    vectors: torch.Tensor  # (m, k) left vectors when side == "left", (n, k) right vectors otherwise
    side: str
    total_energy: float
    retries: list[str] = field(default_factory=list)

    def truncate(self, matrix: torch.Tensor, rank: int) -> LowRank:
        """Return the best rank-`rank` approximation of `matrix` as a projection."""
        basis = self.vectors[:, :rank]
        work = matrix.to(basis.dtype)
        projected = basis.T @ work if self.side == "left" else work @ basis
        return LowRank(basis, projected, self.side, self.sigma, self.total_energy, "exact", True, list(self.retries))


def exact_spectrum(matrix: torch.Tensor) -> Spectrum:
    """Return every singular value of `matrix` and the singular vectors of its smaller side.

    Eigendecomposition of the smaller Gram matrix (`M Mᵀ` when out ≤ in, else `Mᵀ M`), built and
    decomposed in float64 so that σ keeps ~8 more digits than a float32 SVD.
    """
    retries: list[str] = []
    work = matrix.double()
    rows, cols = work.shape
    side = "left" if rows <= cols else "right"
    gram = work @ work.T if side == "left" else work.T @ work
    total = float(torch.diagonal(gram).sum())
    try:
        eigenvalues, eigenvectors = robust_eigh(gram, retries)
    except SvdFailure as failure:
        if not bool(torch.isfinite(gram).all()):
            raise
        # every eigensolver try failed: a full SVD of the matrix itself is the last resort
        retries.append(f"Gram eigendecomposition failed ({failure}); full SVD")
        u, s, vh = robust_svd(work, retries)
        vectors = u if side == "left" else vh.T
        return Spectrum(s.cpu(), vectors, side, total, retries)
    order = torch.flip(torch.arange(eigenvalues.shape[0], device=eigenvalues.device), dims=(0,))
    sigma = eigenvalues[order].clamp_min(0).sqrt()
    vectors = eigenvectors[:, order]
    return Spectrum(sigma.cpu(), vectors, side, total, retries)


# -- randomized route --------------------------------------------------------------------------
def randomized(
    matrix: torch.Tensor,
    rank: int,
    oversampling: int = OVERSAMPLING,
    power_iterations: int = POWER_ITERATIONS,
    seed: int = 0,
    min_iterations: int = MIN_POWER_ITERATIONS,
) -> tuple[LowRank, float, bool]:
    """Return a rank-`rank` projection of `matrix` by a randomized range finder, the estimated
    part of the best rank-`rank` energy it missed (see `missed_energy`), and whether that
    estimate certifies the result (within ERROR_TOLERANCE of the optimum, see `acceptable`).

    The passes over the matrix run in its dtype (float32) on its device; everything of sketch
    size (l = rank + oversampling columns) runs in float64. The basis lives on the smaller
    side; each iteration's `Aᵀ Q` is the sketch `Bᵀ` for the current basis, so its Gram matrix
    serves the orthonormalization of the large side (Cholesky QR), the energy the iteration
    captures and, when the iteration is the last one, the final factors (no SVD of B, no extra
    pass). Iterations stop as soon as the result certifies itself (after `min_iterations`).
    """
    retries: list[str] = []
    rows, cols = matrix.shape
    wide = rows <= cols
    work = matrix if wide else matrix.T  # (small, large)
    sketch = min(rank + oversampling, rows, cols)
    total = energy(matrix)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    test = torch.randn(work.shape[1], sketch, generator=generator).to(device=matrix.device, dtype=matrix.dtype)
    basis = _orthonormal_fast(work @ test)
    captured: list[float] = []
    for iteration in range(power_iterations + 1):
        transposed = (work.T @ basis).double()  # (large, sketch) = Bᵀ for the current basis
        gram = transposed.T @ transposed  # B Bᵀ
        eigenvalues, vectors = robust_eigh(gram, retries)
        eigenvalues, vectors = eigenvalues.flip(0).clamp_min(0), vectors.flip(1)
        captured.append(float(eigenvalues[:rank].sum()))
        missed = missed_energy(captured)
        accepted = acceptable(total - captured[-1], missed, float(eigenvalues[rank:].sum()), total)
        if iteration == power_iterations or (iteration >= min_iterations and accepted):
            break
        large = _cholesky_orthonormal(transposed, gram).to(matrix.dtype)
        basis = _orthonormal_fast(work @ large)
    kept = min(rank, eigenvalues.shape[0])
    rotation = vectors[:, :kept]  # left singular vectors of B, in the basis' coordinates
    final_basis = (basis.double() @ rotation).to(matrix.dtype)
    projected = (transposed @ rotation).T.to(matrix.dtype)  # = final_basisᵀ A, without another pass
    sigma = eigenvalues.sqrt().cpu()
    if wide:
        low = LowRank(final_basis, projected, "left", sigma, total, "randomized", False, retries)
    else:
        low = LowRank(final_basis, projected.T, "right", sigma, total, "randomized", False, retries)
    return low, missed, accepted


def acceptable(error: float, missed: float, tail_lower: float, total: float) -> bool:
    """True when a randomized result's error (‖M − ΔW‖²) is certainly within ERROR_TOLERANCE of
    the optimum: the exact error is at least `error − MISSED_ENERGY_SAFETY·missed` and at least
    the sketch's own tail σ̂²_{r+1..l} (`tail_lower`); accept when even the larger bound holds."""
    exact_lower = max(error - MISSED_ENERGY_SAFETY * missed, tail_lower, 0.0)
    return error <= (ERROR_TOLERANCE ** 2) * exact_lower or error <= 1e-12 * total


def _cholesky_orthonormal(tall: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Return an orthonormal basis of `tall`'s columns (float64) from its Gram matrix: Cholesky
    QR, a GEMM-speed replacement of Householder QR for tall-skinny blocks; Householder QR when
    the block is rank deficient (Cholesky fails)."""
    factor, info = _small(torch.linalg.cholesky_ex, gram)
    if int(info) != 0:
        return _orthonormal(tall)
    return torch.linalg.solve_triangular(factor, tall.T, upper=False).T


def energy(tensor: torch.Tensor) -> float:
    """‖tensor‖²_F, accurate to ~1e-8 relative: float32 row norms summed in float64 (no float64
    copy of the whole matrix)."""
    if tensor.numel() == 0:
        return 0.0
    flat = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(1, -1)
    return float(torch.linalg.vector_norm(flat, dim=1).double().square().sum())


def missed_energy(captured: list[float]) -> float:
    """Estimate the best rank-r energy the last iterate still misses, from the energies
    captured after each power iteration (c_0 ≤ c_1 ≤ … ≤ c_q).

    Subspace iteration converges geometrically, so the remaining gap is about
    d_q·ρ/(1 − ρ) with d_k = c_k − c_{k−1} and ρ = d_q / d_{q−1} (Aitken's extrapolation);
    ρ is capped at 0.95 (slow convergence reads as a large remaining gap, never as none).
    """
    if len(captured) < 2:
        return float("inf")
    # changes below float32 rounding of the sketches are noise, not progress (ratio → cap → 19x)
    noise = FLOAT32_ENERGY_NOISE * abs(captured[-1])
    last = captured[-1] - captured[-2]
    if last <= noise:
        return 0.0
    previous = captured[-2] - captured[-3] if len(captured) >= 3 else 0.0
    ratio = min(last / previous, RATIO_CAP) if previous > 0 else RATIO_CAP
    return last * ratio / (1.0 - ratio)


def fixed_rank(matrix: torch.Tensor, rank: int, *, allow_randomized: bool = True) -> LowRank:
    """Return a rank-`rank` projection of `matrix` whose error is within 1% of the optimum.

    Uses the randomized range finder when `rank` is small against the matrix and keeps its
    result when it certifies itself (`acceptable`); otherwise, and for ranks near the matrix
    size, the exact spectrum.
    """
    rows, cols = matrix.shape
    smaller = min(rows, cols)
    rank = max(1, min(rank, smaller))
    if allow_randomized and rank + OVERSAMPLING <= RANDOMIZED_MAX_FRACTION * smaller:
        work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
        try:
            low, missed, accepted = randomized(work, rank)
        except SvdFailure:
            low, missed, accepted = None, 0.0, False
        if accepted:
            return low
        if low is not None:
            notes = low.retries + [f"randomized estimate too loose (missed ≈ {missed:.3g}); exact route"]
        else:
            notes = ["randomized route failed; exact route"]
        spectrum = exact_spectrum(matrix)
        spectrum.retries = notes + spectrum.retries
        return spectrum.truncate(matrix, rank)
    return exact_spectrum(matrix).truncate(matrix, rank)
