"""Numerical core of extract: exact spectrum, randomized fixed rank with its 1% guarantee, retries,
rank modes against torch.linalg.svdvals (ALGORITHMS.md §15)."""

from __future__ import annotations

import math

import pytest
import torch

from lytools.extract import svd as svd_module
from lytools.extract.ranks import RankRule, raw_rank, select_rank, stores_full
from lytools.extract.svd import SvdFailure, exact_spectrum, fixed_rank, robust_eigh, robust_svd


def designed(rows: int, cols: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A float32 matrix with the given singular values (random singular vectors)."""
    generator = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))
    return ((u * sigma[:k].double()) @ v.T).float()


def spectra(k: int) -> dict[str, torch.Tensor]:
    i = torch.arange(1, k + 1, dtype=torch.float64)
    return {
        "flat": torch.ones(k, dtype=torch.float64),
        "power0.25": i ** -0.25,
        "power0.5": i ** -0.5,
        "power1": i ** -1.0,
        "power2": i ** -2.0,
        "exponential": torch.exp(-i / 20),
        "lowrank+noise": torch.where(i <= 12, 10.0, 0.0) + 0.05,
        "rank40+noise": torch.where(i <= 40, 1.0, 0.0) + 0.1,
    }


def exact_error(matrix: torch.Tensor, rank: int) -> float:
    sigma = torch.linalg.svdvals(matrix.double())
    return math.sqrt(float(sigma[rank:].square().sum()))


def direct_error(matrix: torch.Tensor, low) -> float:
    up, down = low.factors(torch.float64)
    return float(torch.linalg.matrix_norm(matrix.double() - up @ down))


# -- exact spectrum -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(96, 400), (400, 96), (128, 128)])
def test_exact_spectrum_matches_svdvals(shape):
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    spectrum = exact_spectrum(matrix)
    reference = torch.linalg.svdvals(matrix.double())
    assert spectrum.sigma.shape == reference.shape
    assert torch.allclose(spectrum.sigma, reference, rtol=1e-9, atol=1e-9 * float(reference[0]))
    assert spectrum.total_energy == pytest.approx(float(matrix.double().square().sum()), rel=1e-12)
    # truncation is the optimal projection: its error is the spectral tail exactly
    low = spectrum.truncate(matrix, 10)
    assert direct_error(matrix, low) == pytest.approx(exact_error(matrix, 10), rel=1e-6)
    assert math.sqrt(low.error_energy) == pytest.approx(exact_error(matrix, 10), rel=1e-5)


# -- rank modes: the exact route picks the ranks svdvals gives ------------------------------------------
RULES = [
    RankRule("threshold", 0.5), RankRule("threshold", 0.05), RankRule("threshold", 0.0),
    RankRule("ratio", 0.1), RankRule("ratio", 0.5), RankRule("ratio", 0.0), RankRule("ratio", 1.0),
    RankRule("quantile", 0.5), RankRule("quantile", 0.9), RankRule("quantile", 0.99), RankRule("quantile", 0.0),
    RankRule("ratio", 0.05, max_rank=7), RankRule("fixed", 10), RankRule("fixed", 10_000),
]


def reference_rank(sigma: torch.Tensor, rule: RankRule, rows: int, cols: int) -> int:
    """The §15 rules written out directly on svdvals (what LyCORIS's extractor computes)."""
    if rule.mode == "fixed":
        rank = int(rule.value)
    elif rule.mode == "threshold":
        rank = int(torch.sum(sigma > rule.value))
    elif rule.mode == "ratio":
        rank = int(torch.sum(sigma > torch.max(sigma) * rule.value))
    else:
        rank = int(torch.sum(torch.cumsum(sigma, 0) < rule.value * torch.sum(sigma)))
    rank = min(max(1, rank), rows, cols)
    return min(rank, rule.max_rank) if rule.max_rank else rank


@pytest.mark.parametrize("name", list(spectra(8)))
@pytest.mark.parametrize("shape", [(64, 288), (200, 72)])
def test_dynamic_ranks_match_svdvals(name, shape):
    k = min(shape)
    # a small irregular perturbation keeps rational parameters off exact ties (σ_16 = 0.5·σ_1 ...)
    wobble = 1 + 0.003 * torch.rand(k, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    sigma = torch.sort(spectra(k)[name] * wobble, descending=True).values
    matrix = designed(*shape, sigma, seed=3) * 0.7
    spectrum = exact_spectrum(matrix)
    sigma32 = torch.linalg.svdvals(matrix)
    sigma64 = torch.linalg.svdvals(matrix.double())
    for rule in RULES:
        ours = select_rank(spectrum.sigma, rule, *shape)
        expected = reference_rank(sigma64, rule, *shape)
        assert ours == expected, (name, rule)
        if name not in ("flat", "lowrank+noise", "rank40+noise"):  # equal σ: float32 ties may fall either way
            assert ours == reference_rank(sigma32, rule, *shape), (name, rule)


def test_rank_rules_are_strict_and_clamped():
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0])
    assert raw_rank(sigma, RankRule("threshold", 1.0)) == 2  # σ == t is not kept
    assert raw_rank(sigma, RankRule("ratio", 0.25)) == 2  # 1.0 == 0.25·4 is not kept
    assert raw_rank(sigma, RankRule("quantile", 0.75)) == 1  # Σσ = 8: cumsum 4 < 6, but 6 < 6 is false
    assert raw_rank(sigma, RankRule("quantile", 0.8)) == 2  # 4, 6 < 6.4
    assert raw_rank(sigma, RankRule("quantile", 0.5)) == 0
    assert select_rank(sigma, RankRule("quantile", 0.5), 5, 5) == 1  # max(1, r)
    assert select_rank(sigma, RankRule("fixed", 99), 3, 8) == 3  # min(out, in)
    assert select_rank(sigma, RankRule("fixed", 99), 8, 2) == 2
    assert select_rank(sigma, RankRule("threshold", 0.0, max_rank=3), 5, 5) == 3
    assert stores_full(16, 32, kxk_conv=False, tucker=False)
    assert not stores_full(15, 32, kxk_conv=False, tucker=False)
    assert stores_full(16, 32, kxk_conv=True, tucker=False)
    assert not stores_full(16, 32, kxk_conv=True, tucker=True)
    with pytest.raises(ValueError):
        RankRule("ratio", 1.5)
    with pytest.raises(ValueError):
        RankRule("bogus", 1)


# -- fixed rank: randomized within 1% of the optimum, or the exact route ------------------------------
@pytest.mark.parametrize("name", list(spectra(8)) + ["gaussian", "lowrank+gaussian"])
@pytest.mark.parametrize("shape", [(192, 640), (576, 160)])
def test_fixed_rank_error_within_one_percent_of_exact(name, shape):
    rank = 16
    k = min(shape)
    generator = torch.Generator().manual_seed(5)
    if name == "gaussian":
        matrix = torch.randn(shape, generator=generator)
    elif name == "lowrank+gaussian":  # what lytools.testing.build_tuned makes: rank-8 change + noise
        matrix = torch.randn(shape[0], 8, generator=generator) @ torch.randn(8, shape[1], generator=generator) * 0.01
        matrix += 0.003 * torch.randn(shape, generator=generator)
    else:
        matrix = designed(*shape, spectra(k)[name], seed=5)
    low = fixed_rank(matrix, rank)
    assert low.rank == rank
    best = exact_error(matrix, rank)
    ours = direct_error(matrix, low)
    assert ours <= 1.01 * best + 1e-6 * float(torch.linalg.matrix_norm(matrix.double())), (name, low.route, ours / best)
    # the reported error is the measured one
    assert math.sqrt(low.error_energy) == pytest.approx(ours, rel=2e-2, abs=1e-4 * math.sqrt(low.total_energy))


def test_randomized_route_falls_back_to_exact_when_its_estimate_is_too_loose(monkeypatch):
    decaying = designed(192, 640, spectra(192)["power0.5"], seed=2)
    assert fixed_rank(decaying, 8).route == "randomized"
    # a rank close to the matrix size goes to the exact route directly
    assert fixed_rank(decaying, 100).route == "exact"
    monkeypatch.setattr(svd_module, "MISSED_ENERGY_SAFETY", 1e9)
    distrusted = fixed_rank(decaying, 8)
    assert distrusted.route == "exact"
    assert any("exact route" in note for note in distrusted.retries)
    assert direct_error(decaying, distrusted) == pytest.approx(exact_error(decaying, 8), rel=1e-5)


def test_factors_split_sigma_evenly_and_reproduce_the_projection():
    matrix = designed(80, 300, spectra(80)["power1"], seed=4)
    for low in (exact_spectrum(matrix).truncate(matrix, 6), fixed_rank(matrix, 6, allow_randomized=False)):
        up, down = low.factors()
        sigma = torch.linalg.svdvals(matrix.double())[:6]
        # up columns and down rows both carry √σ
        assert torch.allclose(up.double().norm(dim=0), sigma.sqrt(), rtol=1e-4)
        assert torch.allclose(down.double().norm(dim=1), sigma.sqrt(), rtol=1e-4)


# -- failures are retried, never fatal except for non-finite input ------------------------------------
def test_svd_that_fails_to_converge_is_retried(monkeypatch):
    real = torch.linalg.svd
    calls = {"n": 0}

    def flaky(matrix, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    retries: list[str] = []
    matrix = torch.randn(40, 30)
    u, s, vh = robust_svd(matrix, retries)
    assert calls["n"] == 2 and len(retries) == 1 and "retried" in retries[0]
    assert torch.allclose((u * s) @ vh, matrix, atol=1e-4)


def test_eigh_that_fails_is_retried_with_jitter(monkeypatch):
    real = torch.linalg.eigh
    calls = {"n": 0}

    def flaky(matrix, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    matrix = designed(30, 50, spectra(30)["power1"])
    spectrum = exact_spectrum(matrix)
    assert spectrum.retries and "retried" in spectrum.retries[0]
    assert torch.allclose(spectrum.sigma, torch.linalg.svdvals(matrix.double()), atol=1e-6)


def test_when_every_eigensolver_fails_the_full_svd_still_extracts(monkeypatch):
    def broken(matrix, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    matrix = designed(160, 400, spectra(160)["power1"])
    low = fixed_rank(matrix, 8)  # randomized sketch fails, exact Gram route fails, SVD works
    assert low.route == "exact"
    assert any("full SVD" in note for note in low.retries)
    assert direct_error(matrix, low) == pytest.approx(exact_error(matrix, 8), rel=1e-4)
    spectrum = exact_spectrum(matrix.T.contiguous())
    assert torch.allclose(spectrum.sigma.double(), torch.linalg.svdvals(matrix.double()), rtol=1e-4)


def test_non_finite_matrices_raise_svd_failure():
    matrix = torch.randn(20, 30)
    matrix[3, 4] = float("nan")
    with pytest.raises(SvdFailure):
        exact_spectrum(matrix)
    with pytest.raises(SvdFailure):
        robust_svd(matrix, [])
    with pytest.raises(SvdFailure):
        robust_eigh(torch.full((3, 3), float("inf"), dtype=torch.float64), [])


def test_missed_energy_extrapolates_geometric_convergence():
    gap, rho = 0.5, 0.4
    captured = [10.0 - gap * rho ** k for k in range(4)]
    assert svd_module.missed_energy(captured) == pytest.approx(gap * rho ** 3, rel=1e-9)
    assert svd_module.missed_energy([10.0, 10.0, 10.0]) == 0.0  # converged
    assert svd_module.missed_energy([9.0, 10.0]) == pytest.approx(1.0 * 0.95 / 0.05)  # no ratio known: capped
    assert svd_module.missed_energy([10.0]) == float("inf")
