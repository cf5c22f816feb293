"""What AUTOMATIC1111's LoRA loader needs beyond the key names.

A1111 applies the text-encoder attention of SD2 (OpenCLIP ViT-H) and of SDXL's second encoder
(OpenCLIP bigG) through the fused `in_proj_weight` of torch's MultiheadAttention, and only when a
layer's network holds all four of its `q_proj`, `k_proj`, `v_proj` and `out_proj` modules; a layer
with some of them is skipped without a word (extensions-builtin/Lora/networks.py,
`network_apply_weights`). ComfyUI, LyCORIS and diffusers apply each module on its own. So lytools
completes such a layer with zero modules (rank 1, ΔW = 0) in the kohya files it writes: every
loader then applies the same weights, A1111 included.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Collection, Iterable, Mapping

from lytools.arch.network import ALPHA, LORA_DOWN, LORA_UP, _io, split_network_key

if TYPE_CHECKING:
    import torch

OPEN_CLIP_PREFIX = {"sd2": "lora_te_", "sdxl": "lora_te2_"}  # the encoder A1111 runs as OpenCLIP
_ATTENTION = re.compile(r"^(lora_te2?_text_model_encoder_layers_\d+_self_attn)_(q|k|v|out)_proj$")
PARTS = ("q", "k", "v", "out")


def missing_attention_parts(arch: str, modules: Iterable[str]) -> dict[str, str]:
    """Return {missing module: a module of the same layer that is there} for the OpenCLIP attention
    layers of `arch` that hold some but not all of q/k/v/out (nothing for other architectures)."""
    prefix = OPEN_CLIP_PREFIX.get(arch)
    if prefix is None:
        return {}
    layers: dict[str, list[str]] = {}
    for name in modules:
        found = _ATTENTION.match(name)
        if found and name.startswith(prefix):
            layers.setdefault(found.group(1), []).append(name)
    missing: dict[str, str] = {}
    for layer, present in sorted(layers.items()):
        for part in PARTS:
            name = f"{layer}_{part}_proj"
            if name not in present:
                missing[name] = sorted(present)[0]
    return missing


def may_be_filler(arch: str, name: str, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether a module has the name and shapes of complete_attention_layers' zero modules in `arch` (an
    OpenCLIP attention part with lora_down [1, in], lora_up [out, 1] and alpha only); its values decide."""
    prefix = OPEN_CLIP_PREFIX.get(arch)
    if prefix is None or not name.startswith(prefix) or not _ATTENTION.match(name) or set(shapes) != {LORA_DOWN, LORA_UP, ALPHA}:
        return False
    down, up = shapes[LORA_DOWN], shapes[LORA_UP]
    return len(down) == 2 and len(up) == 2 and down[0] == 1 and up[1] == 1


def fillers(modules: Iterable[str], zero: Collection[str]) -> set[str]:
    """Return the modules of `zero` (may_be_filler modules whose factors are all zero) that share their
    attention layer with a module not in `zero`: the zero modules a completed layer holds. (A layer of
    zero modules only was not completed by anyone: nothing in it was trained.)"""
    trained = {found.group(1) for name in modules if name not in zero and (found := _ATTENTION.match(name))}
    return {name for name in zero if (found := _ATTENTION.match(name)) and found.group(1) in trained}


def _modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {suffix: tensor}} of a network's tensors."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        split = split_network_key(key)
        if split is not None:
            modules.setdefault(split[0], {})[split[1]] = tensor
    return modules


def complete_attention_layers(arch: str, tensors: dict[str, torch.Tensor],
                              modules: dict[str, dict[str, torch.Tensor]] | None = None) -> list[str]:
    """Add a zero LoRA module (lora_down [1, in], lora_up [out, 1], alpha 1) to `tensors` for each
    attention part missing_attention_parts names; return the names added (sorted). `modules`: the
    tensors grouped by _modules, when the caller has them already.

    The zero factors take the dtype of the layer's other module; its size (the OpenCLIP width,
    q/k/v/out are square) from that module's ΔW."""
    import torch

    if modules is None:
        modules = _modules(tensors)
    added = []
    for name, sibling in missing_attention_parts(arch, modules).items():
        factors = modules[sibling]
        size = _io(sibling, {suffix: tuple(t.shape) for suffix, t in factors.items()})
        if size is None:
            continue  # a module whose shape cannot be read: nothing sensible to add
        weights = [t for suffix, t in factors.items() if suffix != ALPHA and t.is_floating_point()]
        if not weights:
            continue
        dtype = weights[0].dtype
        alpha = factors.get(ALPHA)
        tensors[f"{name}.{LORA_DOWN}"] = torch.zeros(1, size[1], dtype=dtype)
        tensors[f"{name}.{LORA_UP}"] = torch.zeros(size[0], 1, dtype=dtype)
        tensors[f"{name}.{ALPHA}"] = torch.tensor(1.0, dtype=alpha.dtype if alpha is not None and alpha.is_floating_point() else dtype)
        added.append(name)
    return added


def completed_note(arch: str, added: list[str]) -> str:
    """The line that tells the user about complete_attention_layers' additions."""
    layers = sorted({_ATTENTION.match(name).group(1) for name in added})
    return (f"added {len(added)} zero modules ({', '.join(added[:2])}{', ...' if len(added) > 2 else ''}) to "
            f"{len(layers)} {arch} OpenCLIP attention layers that had only some of q/k/v/out: AUTOMATIC1111 "
            f"applies such a layer only whole (ΔW unchanged)")


def complete_for_a1111(tensors: dict[str, torch.Tensor], arch: str | None = None,
                       metadata: Mapping[str, str] | None = None) -> tuple[list[str], str | None]:
    """complete_attention_layers for `arch` (detected from the tensors' names and shapes when None,
    only if some layer would need it); return (the modules added, the note to show or None)."""
    modules = _modules(tensors)
    wanted = [a for a in OPEN_CLIP_PREFIX if (arch is None or a == arch) and missing_attention_parts(a, modules)]
    if not wanted:
        return [], None
    if arch is None:
        from lytools.arch.network import detect_network

        found = detect_network({key: tuple(t.shape) for key, t in tensors.items()}, metadata or {})
        # a tie (lora_te2_ alone fits sdxl and sd3; a stripped file has no metadata to settle it) that includes an
        # architecture A1111 needs whole layers for: the zero modules change nothing for the others
        tied = [a for a in found.tied if a in wanted]
        arch = found.arch if found.arch != "unknown" or len(tied) != 1 else tied[0]
        if arch not in wanted:
            return [], None
    added = complete_attention_layers(arch, tensors, modules)
    return added, completed_note(arch, added) if added else None
