"""The name tables shipped as package data (copies of ../shared/fixtures/manifests, gzipped).

Each loader parses its table once per process (functools.cache) and only when first asked,
so `import lytools` stays cheap. The tables are generated data: never patch them here,
regenerate them upstream and copy them again.
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources

ARCHS_WITH_CHECKPOINT = ("sd1", "sd2", "sdxl", "sd3", "flux")
ARCHS_WITH_LORA_NAMES = ("sd1", "sd2", "sdxl", "flux")
ARCHS_WITH_DIFFUSERS_NAMES = ("sd1", "sdxl")


@functools.cache
def _load(name: str) -> dict:
    resource = resources.files("lytools.arch").joinpath("data", f"{name}.json.gz")
    with resource.open("rb") as handle:
        return json.loads(gzip.decompress(handle.read()))


def checkpoint_manifest(arch: str) -> dict:
    """Return `<arch>-checkpoint.json`: keys, shapes and release dtypes of the full checkpoint."""
    if arch not in ARCHS_WITH_CHECKPOINT:
        raise KeyError(f"no checkpoint table for architecture {arch!r}")
    return _load(f"{arch}-checkpoint")


def lora_names(arch: str) -> dict:
    """Return `<arch>-lora-names.json`: kohya module name -> checkpoint key, kind, shape."""
    if arch not in ARCHS_WITH_LORA_NAMES:
        raise KeyError(f"no kohya module table for architecture {arch!r}")
    return _load(f"{arch}-lora-names")


def diffusers_names(arch: str) -> dict:
    """Return `<arch>-diffusers-names.json` (sd1, sdxl; sd2 shares sd1's UNet paths)."""
    if arch not in ARCHS_WITH_DIFFUSERS_NAMES:
        raise KeyError(f"no diffusers module table for architecture {arch!r}")
    return _load(f"{arch}-diffusers-names")
