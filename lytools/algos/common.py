"""Records and small helpers shared by every algorithm file (spec: ALGORITHMS.md sections 1 and 13)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch

from lytools.arch import network as _layout
from lytools.errors import NetworkError

# suffix -> tensor shape (header-only view of one module)
Shapes = Mapping[str, tuple[int, ...]]
# tiny scalar tensors whose values detection may use: "alpha", "on_input"
Scalars = Mapping[str, float]

# keys any rank-based algorithm may carry besides its own factors (named with the key layouts)
ALPHA, DORA_SCALE = _layout.ALPHA, _layout.DORA_SCALE


@dataclass(frozen=True)
class NetworkModule:
    """One network module: its `<lora_name>` and its tensors keyed by suffix (`lora_up.weight`)."""

    name: str
    tensors: Mapping[str, torch.Tensor]

    def __getitem__(self, suffix: str) -> torch.Tensor:
        return self.tensors[suffix]

    def __contains__(self, suffix: object) -> bool:
        return suffix in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def get(self, suffix: str) -> torch.Tensor | None:
        return self.tensors.get(suffix)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Return {suffix: shape} for every tensor of the module."""
        return {suffix: tuple(tensor.shape) for suffix, tensor in self.tensors.items()}

    def scalars(self) -> dict[str, float]:
        """Return the values of the scalar keys detection reads (alpha, on_input) when present."""
        values: dict[str, float] = {}
        for suffix in (ALPHA, "on_input"):
            tensor = self.tensors.get(suffix)
            if tensor is not None:
                values[suffix] = read_scalar(self.name, suffix, tensor)
        return values

    def to(self, device: torch.device, dtype: torch.dtype) -> NetworkModule:
        """Return a copy with floating tensors on `device` in `dtype`; integer tensors keep their dtype."""
        moved = {}
        for suffix, tensor in self.tensors.items():
            if tensor.is_floating_point():
                moved[suffix] = tensor.to(device=device, dtype=dtype)
            else:
                moved[suffix] = tensor.to(device=device)
        return NetworkModule(self.name, moved)


@dataclass(frozen=True)
class ModuleInfo:
    """What one module is, read from its key set and shapes alone (plus alpha when known).

    `delta_shape` is the shape of ΔW the factors imply: `(out, in)`, `(out, in, kh, kw)`,
    `(out, in·K)` when the factors store a conv flattened and cannot tell its kernel
    (LoHa/LoKr without Tucker), `(C,)` for norms; None where the target decides (ia3, oft).
    """

    name: str
    algo: str  # lora | loha | lokr | full | ia3 | glora | oft | boft | norm | tlora
    suffixes: tuple[str, ...]
    rank: int | None = None
    alpha: float | None = None  # the stored alpha value (None: absent, or not given)
    scale: float | None = None  # s = alpha / rank; None when alpha is stored but not given
    kernel: tuple[int, ...] | None = None  # spatial kernel; () for linear-shaped factors; None: unknown
    tucker: bool = False
    delta_shape: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None  # oft (n, b); boft (M, n, b)
    constraint: float | None = None  # oft/boft: alpha is the constraint coefficient
    lokr_w1: tuple[int, int] | None = None  # (a, c): the Kronecker factor sizes of the first half
    lokr_full: tuple[bool, bool] | None = None  # whether each LoKr half is stored whole
    on_input: bool | None = None  # ia3 axis; None when its value was not given
    variant: str | None = None  # "old-layout" (glora), "legacy" (oft_diag)
    dora: str | None = None  # "out" | "in": DoRA norm axis
    sparse_bias: bool = False  # LyCORIS extractor's sparse weight correction present
    additive: bool = True  # W' = W + m·ΔW (False for DoRA, ia3, oft, boft, tlora)
    needs_weight: bool = False  # ΔW or the merge depends on the base weight
    bias_delta: bool = False  # the module changes the layer bias
    mergeable: bool = True  # False for T-LoRA

    @property
    def out_features(self) -> int | None:
        """Output channels the module changes, when its tensors tell (oft/boft: n·b)."""
        if self.delta_shape:
            return self.delta_shape[0]
        if self.blocks:  # oft (n, b), boft (M, n, b)
            return self.blocks[-2] * self.blocks[-1]
        return None

    @property
    def is_conv(self) -> bool:
        """True for a spatial (kxk, k > 1) conv module as far as the factors tell."""
        return bool(self.kernel) and any(k != 1 for k in self.kernel)


def fail(name: str, problem: str) -> NetworkError:
    """Return the error for an incomplete or inconsistent module; the message names it."""
    return NetworkError(f"module {name}: {problem}")


def require(name: str, shapes: Shapes, *suffixes: str) -> None:
    """Raise unless every suffix is present in the module."""
    missing = [s for s in suffixes if s not in shapes]
    if missing:
        have = ", ".join(sorted(shapes))
        raise fail(name, f"missing {', '.join(missing)} (has {have})")


def reject_foreign(name: str, shapes: Shapes, allowed: Sequence[str], algo: str) -> None:
    """Raise when the module holds keys that belong to no part of `algo` (mixed algorithms)."""
    foreign = sorted(set(shapes) - set(allowed))
    if foreign:
        raise fail(name, f"{algo} module also holds {', '.join(foreign)}: mixed or unknown key set")


def expect_ndim(name: str, suffix: str, shape: tuple[int, ...], *ndims: int) -> None:
    if len(shape) not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise fail(name, f"{suffix} has shape {list(shape)}, expected {want} dimensions")


def check_finite(modules: Mapping[str, NetworkModule]) -> None:
    """Raise NetworkError naming the first module tensor that holds inf or NaN values: such a file
    is damaged (a diverged training run, a bad conversion), and merging or resizing it would spread
    them silently. Network tensors are small; this reads each once."""
    for name, module in modules.items():
        for suffix, tensor in module.tensors.items():
            if tensor.is_floating_point() and tensor.dtype.itemsize == 1:
                tensor = tensor.float()  # torch has no isfinite for fp8
            if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
                count = int((~torch.isfinite(tensor)).sum())
                raise fail(name, f"{suffix} holds {count} non-finite values (inf/NaN): the file is damaged")


def read_scalar(name: str, suffix: str, tensor: torch.Tensor) -> float:
    """Return float(tensor.flatten()[0]) for a 0-d or (1,) tensor of any dtype."""
    if tensor.numel() < 1:
        raise fail(name, f"{suffix} is empty")
    first = tensor if tensor.numel() == 1 else tensor.detach().reshape(-1)[0]
    value = float(first.item())  # exact for every float dtype (fp16, bf16 and fp8 widen to double exactly)
    if not math.isfinite(value):
        raise fail(name, f"{suffix} is {value}")
    return value


def scale_for(alpha: float | None, rank: int) -> float:
    """Return s = alpha / rank, with a missing or zero alpha meaning alpha = rank (ALGORITHMS.md 1.3)."""
    if alpha is None or alpha == 0:
        return 1.0
    return alpha / rank


def scale_from_scalars(shapes: Shapes, scalars: Scalars, rank: int) -> tuple[float | None, float | None]:
    """Return (alpha, scale): scale is None only when alpha is stored but its value was not given."""
    if ALPHA not in shapes:
        return None, 1.0
    alpha = scalars.get(ALPHA)
    if alpha is None:
        return None, None
    return alpha, scale_for(alpha, rank)


def module_scale(module: NetworkModule, rank: int) -> float:
    """Return s for a rank-based module from its tensors."""
    alpha = module.get(ALPHA)
    return scale_for(None if alpha is None else read_scalar(module.name, ALPHA, alpha), rank)


def flat2(tensor: torch.Tensor) -> torch.Tensor:
    """Return the tensor as a matrix keeping dim 0: (shape[0], -1)."""
    return tensor.reshape(tensor.shape[0], -1)


def tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """Return Σ_ij core[i, j, …]·out_factor[i, o]·in_factor[j, c], shaped (out, in, …).

    The Tucker/CP rebuild shared by `lora_mid`, `hada_t1/t2`, `lokr_t2` and GLoRA's `bm`:
    `core` is (r, r, kh, kw), `out_factor` (r, out), `in_factor` (r, in).
    """
    return torch.einsum("ij...,io,jc->oc...", core, out_factor, in_factor)


def fit_to(name: str, delta: torch.Tensor, target_shape: Sequence[int]) -> torch.Tensor:
    """Return ΔW reshaped to the target weight shape, or raise if they cannot be the same layer."""
    target = torch.Size(target_shape)
    if delta.numel() != target.numel() or (len(target) and delta.shape[0] != target[0]):
        raise fail(name, f"weight change of shape {list(delta.shape)} does not fit target weight {list(target)}")
    return delta.reshape(target)


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Return R = (I + Q)(I − Q)⁻¹ per block with Q = B − Bᵀ, its norm clamped to `constraint` when > 0.

    The norm is taken over all blocks together (ALGORITHMS.md 9, 10); `blocks` is (..., b, b).
    """
    skew = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.vector_norm(skew) + 1e-8
        if norm > constraint:
            skew = skew * (constraint / norm)
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    # (I + Q)(I − Q)⁻¹ = solve on the right: X (I − Q) = (I + Q)
    return torch.linalg.solve(eye - skew, eye + skew, left=False)


def toward_identity(rotation: torch.Tensor, ratio: float) -> torch.Tensor:
    """Return m·R + (1 − m)·I for a stack of square matrices."""
    if ratio == 1.0:
        return rotation
    eye = torch.eye(rotation.shape[-1], device=rotation.device, dtype=rotation.dtype)
    return rotation * ratio + eye * (1.0 - ratio)
