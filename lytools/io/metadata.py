"""Metadata conventions (FORMATS.md 5): what lytools keeps, updates and adds.

Every output keeps the keys it does not change, drops stale `sshs_*` hashes (commands put
fresh ones back with `lytools.io.with_sshs_hashes`), and records its own provenance:
`lytools.version`, `lytools.command`, `lytools.sources` (JSON list of input names and AutoV3).
"""

from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Iterable, Mapping

from lytools import __version__

MODELSPEC_ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sd3": "stable-diffusion-3-medium",
    "flux": "flux-1-dev",
    "chroma": "chroma",
}
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "medium", "flux": "flux1", "chroma": "chroma"}
IMPLEMENTATIONS = {
    "sd1": "diffusers",
    "sd2": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "sd3": "https://github.com/Stability-AI/generative-models",
    "flux": "https://github.com/black-forest-labs/flux",
}
RESOLUTIONS = {"sd1": "512x512", "sd2": "512x512", "sdxl": "1024x1024", "sd3": "1024x1024", "flux": "1024x1024"}  # sd2: with stable-diffusion-v2-512 (768-v is labelled where known: extract)


_invocation: list[str] | None = None


def set_invocation(args: list[str]) -> None:
    """Record the lytools arguments being run (cli.main calls it; sys.argv is not ours in-process)."""
    global _invocation
    _invocation = list(args)


def command_line() -> str:
    """Return the command line that is running, as a user would type it."""
    args = _invocation if _invocation is not None else sys.argv[1:]
    return "lytools " + " ".join(shlex.quote(arg) for arg in args)


def source_entry(path: str | Path, autov3: str | None = None) -> dict[str, str]:
    """Return one `lytools.sources` entry: file name and, when known, its AutoV3 hash."""
    entry = {"name": Path(path).name}
    if autov3:
        entry["autov3"] = autov3[:12]
    return entry


def carried(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Return input metadata minus what must never be copied forward (stale hashes, our own keys)."""
    return {
        key: value
        for key, value in (metadata or {}).items()
        if not key.startswith("sshs_") and not key.startswith("lytools.") and key != "modelspec.hash_sha256"
    }


def add_provenance(
    metadata: Mapping[str, str],
    command: str | None = None,
    sources: Iterable[Mapping[str, str]] = (),
) -> dict[str, str]:
    """Return metadata with lytools.version / lytools.command / lytools.sources set."""
    result = dict(metadata)
    result["lytools.version"] = __version__
    result["lytools.command"] = command if command is not None else command_line()
    source_list = list(sources)
    if source_list:
        result["lytools.sources"] = json.dumps(source_list, separators=(",", ":"))
    return result


def modelspec_date() -> str:
    """Now, as modelspec.date is written (local time to the second, ISO 8601, as sd-scripts writes it)."""
    return datetime.now().replace(microsecond=0).isoformat()


def network_modelspec(arch: str | None, title: str, *, is_lora: bool = True) -> dict[str, str]:
    """Return the modelspec.* keys sd-scripts writes for a network of this architecture."""
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.title": title,
        "modelspec.date": modelspec_date(),
    }
    if arch in MODELSPEC_ARCHITECTURES:
        suffix = "/lora" if is_lora else ""
        spec["modelspec.architecture"] = MODELSPEC_ARCHITECTURES[arch] + suffix
        spec["modelspec.implementation"] = IMPLEMENTATIONS.get(arch, "diffusers")
        spec["modelspec.resolution"] = RESOLUTIONS.get(arch, "512x512")
        if arch != "flux":
            spec["modelspec.prediction_type"] = "epsilon"
    return spec


def kohya_network_metadata(arch: str | None, dim: int | str, alpha: float | str, network_args: Mapping[str, str] | None = None,
                           module: str = "networks.lora") -> dict[str, str]:
    """Return the ss_* keys sd-scripts writes for an extracted or rewritten LoRA."""
    meta = {
        "ss_network_module": module,
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(dict(network_args or {})),
    }
    if arch in BASE_MODEL_VERSIONS:
        meta["ss_base_model_version"] = BASE_MODEL_VERSIONS[arch]
        meta["ss_v2"] = "True" if arch == "sd2" else "False"
    return meta


def summarize(metadata: Mapping[str, str]) -> dict[str, str]:
    """Return the metadata a user cares about at a glance (ss_*, modelspec.*, lytools.*), long values cut."""
    wanted = {}
    for key, value in metadata.items():
        if key.startswith(("ss_", "modelspec.", "lytools.", "sshs_")):
            wanted[key] = value if len(value) <= 200 else value[:197] + "..."
    return wanted
