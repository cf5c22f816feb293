"""The one place where lytools decides which device and precision math runs on."""

from __future__ import annotations

import torch

from lytools.errors import DeviceError, UsageError

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Return the torch device for `auto|cpu|cuda|cuda:N`; a CUDA request without CUDA is an error."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        return device
    raise UsageError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")


def compute_dtype(name: str = "float32") -> torch.dtype:
    """Return the float dtype math runs in (float32 by default, float64 on request)."""
    try:
        return COMPUTE_DTYPES[name]
    except KeyError:
        raise DeviceError(f"compute precision {name!r}: expected float32 or float64") from None
