"""Split network-file keys into modules: `<lora_name>.<suffix>`, split at the first '.'
(spec: ALGORITHMS.md 1.1; FORMATS.md 3.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from lytools.algos.common import NetworkModule
from lytools.algos.detect import KNOWN_SUFFIXES, SHARED_SUFFIXES

# longest first, so that lora_te1_ wins over lora_te_
KNOWN_PREFIXES: tuple[str, ...] = (
    "lora_prior_unet_", "lora_prior_te_", "lora_transformer_", "lora_unet_", "lora_te1_", "lora_te2_",
    "lora_te3_", "lora_te_", "oft_unet_", "lycoris_",
)


@dataclass
class KeyGroups:
    """Module name -> {suffix: full key}, and the keys that belong to no module."""

    modules: dict[str, dict[str, str]] = field(default_factory=dict)
    stray: list[str] = field(default_factory=list)


def split_key(key: str) -> tuple[str, str] | None:
    """Return (lora_name, suffix) split at the first '.', or None when the key has no '.'."""
    name, dot, suffix = key.partition(".")
    if not dot or not name or not suffix:
        return None
    return name, suffix


def module_prefix(name: str) -> str | None:
    """Return the known prefix of a module name (`lora_unet_`, `lora_te1_`, `lycoris_`, …) or None."""
    return next((prefix for prefix in KNOWN_PREFIXES if name.startswith(prefix)), None)


def group_keys(keys: Iterable[str]) -> KeyGroups:
    """Group full keys by module; keys with no known suffix are stray, never an error.

    A group left with only `alpha`/`dora_scale`, or with a lone `weight` under an unknown prefix
    (e.g. `text_projection.weight`), is stray too: it carries no network module.
    """
    groups = KeyGroups()
    for key in keys:
        parts = split_key(key)
        if parts is None or parts[1] not in KNOWN_SUFFIXES:
            groups.stray.append(key)
            continue
        name, suffix = parts
        groups.modules.setdefault(name, {})[suffix] = key
    for name in list(groups.modules):
        suffixes = set(groups.modules[name])
        lone_weight = suffixes == {"weight"} and module_prefix(name) is None
        if suffixes <= SHARED_SUFFIXES or lone_weight:
            groups.stray.extend(groups.modules.pop(name).values())
    return groups


def load_module(source: Any, name: str, keys: Mapping[str, str]) -> NetworkModule:
    """Return module `name` with its tensors read from `source` (anything with `.get(full_key)`,
    e.g. an open lytools.io file); `keys` is its entry of `KeyGroups.modules`. The tensors may
    view the source's memory map: use them while the source is open."""
    return NetworkModule(name, {suffix: source.get(full_key) for suffix, full_key in keys.items()})
