"""Metadata conventions (FORMATS.md 5): what lytools keeps, updates and adds.

Every output keeps the keys it does not change, drops stale `sshs_*` hashes (commands put
fresh ones back with `lytools.io.with_sshs_hashes`), and records its own provenance:
`lytools.version`, `lytools.command`, `lytools.sources` (JSON list of input names and AutoV3).

`--strip-metadata` (every command that writes; `stripped`) keeps only what a loader reads from the
metadata to apply the tensors, and nothing else: no training record (`ss_*`), no modelspec, no
provenance (`lytools.*`), no hashes, no file names. What loaders read (checked against their code):
- diffusers reads `lora_adapter_metadata` (LoraConfig per component: r, lora_alpha, rank/alpha
  patterns, use_dora, lora_bias), the only place of the scale in a `--no-fold` diffusers file; kept,
  as is the `<component>_lora_adapter_metadata` spelling of training scripts (lytools reads both),
  without peft's `base_model_name_or_path` / `revision` fields, which name a model and apply nothing.
  peft's adapter_config.json is a file of its own, written unchanged (it names no input).
- checkpoints keep `format` (transformers refuses a model file whose metadata lacks it: a diffusers
  folder's text encoders) and `_quantization_metadata` (ComfyUI's per-layer formats of a mixed
  precision checkpoint). Networks do not keep `format`: no network loader reads it, and A1111 files a
  network whose metadata names no base model under SD1, hiding it next to SDXL models (a network with
  no metadata at all is shown for every model).
- nothing else: ComfyUI, A1111/Forge, LyCORIS, kohya and diffusers take a network's kind, ranks,
  alphas and DoRA axis from the tensors, and a checkpoint's architecture and prediction type from
  its keys (a `v_pred` marker tensor stays; `modelspec.architecture` / `prediction_type` serve UI
  filters and lytools' own detection only). `sshs_model_hash` / `sshs_legacy_hash` are not written:
  A1111/Forge compute the same AutoV3 from the data when a file has none, so no input or output hash
  is computed either.
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


def carried_into_tensors(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """carried(), less diffusers' LoraConfig metadata: for an output whose scales are in its tensors (kohya factors
    and alpha tensors, a rebuilt diffusers file), where that config (the ranks it had) is stale, and diffusers
    refuses a file holding both alphas and that key."""
    return {key: value for key, value in carried(metadata).items() if not is_adapter_metadata(key)}


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


# -- --strip-metadata ------------------------------------------------------------------------------
ADAPTER_METADATA = "lora_adapter_metadata"
CHECKPOINT_LOADER_KEYS = ("format", "_quantization_metadata")
_NAMING_FIELDS = ("base_model_name_or_path", "revision")  # peft LoraConfig fields naming a model, not applied


def is_adapter_metadata(key: str) -> bool:
    """True for diffusers' LoraConfig metadata (`lora_adapter_metadata`, `<component>_lora_adapter_metadata`)."""
    return key == ADAPTER_METADATA or key.endswith("_" + ADAPTER_METADATA)


def _without_names(value: str) -> str:
    """Return adapter metadata JSON without the peft fields that name a base model (or a local path):
    `base_model_name_or_path`, `revision`, bare (`<component>_lora_adapter_metadata`, one LoraConfig) or
    as `<component>.<field>` (diffusers' `lora_adapter_metadata`)."""
    try:
        config = json.loads(value)
    except ValueError:
        return value  # not ours to repair: the readers name it
    if not isinstance(config, dict):
        return value
    naming = [key for key in config if key.rpartition(".")[2] in _NAMING_FIELDS]
    if not naming:
        return value  # unchanged, byte for byte
    for key in naming:
        del config[key]
    return json.dumps(config, sort_keys=True)


def stripped(metadata: Mapping[str, str] | None, *, checkpoint: bool = False) -> dict[str, str]:
    """Return what `--strip-metadata` keeps of an output's metadata (module docstring): the adapter
    configs diffusers reads, and for a checkpoint (`checkpoint=True`) `format` and `_quantization_metadata`."""
    kept: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if is_adapter_metadata(key):
            kept[key] = _without_names(value)
        elif checkpoint and key in CHECKPOINT_LOADER_KEYS:
            kept[key] = value
    return kept


# what a file tells whoever receives it beyond its weights (info names them; --strip-metadata drops them)
REVEALING_KEYS = {
    "ss_dataset_dirs": "dataset folders",
    "ss_reg_dataset_dirs": "dataset folders",
    "ss_datasets": "dataset folders",
    "ss_tag_frequency": "captions",
    "lytools.sources": "input file names",
    "lytools.command": "input file names",
    "modelspec.merged_from": "input file names",
}


def revealing(metadata: Mapping[str, str] | None) -> list[str]:
    """Return the keys of `metadata` that reveal the training data or local file names (REVEALING_KEYS)."""
    return [key for key in REVEALING_KEYS if key in (metadata or {})]
