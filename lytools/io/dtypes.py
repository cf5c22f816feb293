"""safetensors dtype names, their sizes, and the torch dtypes they map to (FORMATS.md 1.2).

torch is imported on first use of a torch mapping (TORCH_DTYPES, SAFETENSORS_NAMES, SAVE_DTYPES
are built then), so header-only work (info, the convert fast path) never pays for importing it.
"""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from lytools.errors import LytoolsError

if TYPE_CHECKING:
    import torch

# name -> bytes per element (F4 and F6 are sub-byte: stored as a Fraction)
ITEM_SIZES: dict[str, Fraction] = {
    "BOOL": Fraction(1), "U8": Fraction(1), "I8": Fraction(1),
    "I16": Fraction(2), "U16": Fraction(2), "F16": Fraction(2), "BF16": Fraction(2),
    "I32": Fraction(4), "U32": Fraction(4), "F32": Fraction(4),
    "I64": Fraction(8), "U64": Fraction(8), "F64": Fraction(8), "C64": Fraction(8),
    "F8_E4M3": Fraction(1), "F8_E5M2": Fraction(1), "F8_E8M0": Fraction(1),
    "F4": Fraction(1, 2), "F6_E2M3": Fraction(3, 4), "F6_E3M2": Fraction(3, 4),
}


FLOAT_NAMES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
FP8_NAMES = frozenset({"F8_E4M3", "F8_E5M2"})


@functools.cache
def _torch_maps() -> dict[str, dict]:
    import torch

    def known(name: str):
        return getattr(torch, name, None)

    torch_dtypes = {
        name: dtype
        for name, dtype in {
            "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
            "I16": torch.int16, "U16": known("uint16"), "F16": torch.float16,
            "BF16": torch.bfloat16, "I32": torch.int32, "U32": known("uint32"),
            "F32": torch.float32, "I64": torch.int64, "U64": known("uint64"),
            "F64": torch.float64, "C64": torch.complex64,
            "F8_E4M3": known("float8_e4m3fn"), "F8_E5M2": known("float8_e5m2"),
            "F8_E8M0": known("float8_e8m0fnu"), "F4": known("float4_e2m1fn_x2"),
        }.items()
        if dtype is not None
    }
    return {
        "TORCH_DTYPES": torch_dtypes,
        "SAFETENSORS_NAMES": {dtype: name for name, dtype in torch_dtypes.items()},
        # user-facing --save-dtype spellings
        "SAVE_DTYPES": {
            "fp32": torch.float32, "float32": torch.float32,
            "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
            "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp64": torch.float64,
            "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
        },
    }


def __getattr__(name: str) -> Any:
    """TORCH_DTYPES (name -> torch dtype), SAFETENSORS_NAMES (the reverse) and SAVE_DTYPES
    (--save-dtype spelling -> torch dtype), built on first use."""
    maps = _torch_maps() if name in ("TORCH_DTYPES", "SAFETENSORS_NAMES", "SAVE_DTYPES") else None
    if maps is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return maps[name]


def torch_dtype_of(name: str) -> torch.dtype | None:
    """Return the torch dtype of a safetensors dtype name (None: torch has none)."""
    return _torch_maps()["TORCH_DTYPES"].get(name)

# writing order (FORMATS.md 1.4): wider dtypes first so each tensor stays naturally aligned
_ORDER_RANK = {name: -float(size) for name, size in ITEM_SIZES.items()}


def order_key(dtype_name: str, tensor_name: str) -> tuple:
    """Sort key for the file order safetensors' own writer uses: size descending, then name."""
    return (_ORDER_RANK[dtype_name], tensor_name)


def st_name(dtype: torch.dtype) -> str:
    """Return the safetensors name of a torch dtype."""
    try:
        return _torch_maps()["SAFETENSORS_NAMES"][dtype]
    except KeyError:
        raise LytoolsError(f"dtype {dtype} cannot be stored in safetensors") from None


def parse_save_dtype(name: str | None) -> torch.dtype | None:
    """Return the torch dtype for a --save-dtype value (None keeps the input dtype)."""
    if name is None:
        return None
    try:
        return _torch_maps()["SAVE_DTYPES"][name.lower()]
    except KeyError:
        raise LytoolsError(
            f"--save-dtype {name}: expected one of fp32, fp16, bf16, fp8_e4m3, fp8_e5m2"
        ) from None


_WHOLE_SIZES = {name: int(size) for name, size in ITEM_SIZES.items() if size.denominator == 1}


def byte_size(dtype_name: str, shape: tuple[int, ...]) -> int | Fraction:
    """Return the exact byte size of a tensor (a Fraction for sub-byte dtypes that do not fill bytes)."""
    numel = 1
    for dim in shape:
        numel *= dim
    whole = _WHOLE_SIZES.get(dtype_name)
    if whole is not None:
        return whole * numel
    size = ITEM_SIZES[dtype_name] * numel
    return int(size) if size.denominator == 1 else size


def is_float(dtype: torch.dtype) -> bool:
    """True for the floating dtypes lytools computes on or casts (fp8 included)."""
    names = _torch_maps()["SAFETENSORS_NAMES"]
    return dtype.is_floating_point and dtype in names and names[dtype] in FLOAT_NAMES


def saturating_cast(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """Return (`tensor` in `dtype`, whether any finite value lay beyond `dtype`'s finite range).

    In-range values round to nearest exactly as `tensor.to(dtype)`; finite values beyond the range
    become ±max instead of what torch gives (inf for fp16/bf16/fp8_e5m2, a silent ±448 for
    fp8_e4m3), so a narrowing --save-dtype never writes an inf the input did not hold. Integer and
    bool tensors, and casts that do not narrow the range, are plain `.to(dtype)`.
    """
    import torch

    if not (tensor.is_floating_point() and dtype.is_floating_point) or tensor.dtype == dtype:
        return tensor.to(dtype), False
    limit = torch.finfo(dtype).max
    if torch.finfo(tensor.dtype).max <= limit:
        return tensor.to(dtype), False
    if tensor.numel() == 0:
        return tensor.to(dtype), False
    # one reduction pass, no temporary: the usual tensor fits (NaN fails both tests and goes on)
    low, high = torch.aminmax(tensor if tensor.dtype.itemsize > 1 else tensor.float())
    if -float(low) <= limit and float(high) <= limit:
        return tensor.to(dtype), False
    wide = tensor if tensor.dtype.itemsize >= 4 else tensor.float()  # limit is not exact in bf16
    beyond = (wide.abs() > limit) & torch.isfinite(wide)
    if not bool(beyond.any()):
        return tensor.to(dtype), False
    return torch.where(beyond, wide.sign() * limit, wide).to(dtype), True
