"""Which architecture and key layout a network file uses, from its header (FORMATS.md 2.3, 3).

`split_network_key` turns any supported key spelling into (module name, suffix) with the suffix
in LyCORIS/kohya spelling (`lora_A.weight` -> `lora_down.weight`, `lora_magnitude_vector` ->
`dora_scale`), so the algorithm detection in lytools.algos reads every layout alike.

`detect_network` scores each architecture by how many modules resolve in its alias table
(keymap.alias_table) *and* have the table's shape, at the shrink factor that fits best (1 for
real files): sd1 and sd2 share UNet names but differ in cross-attention and text-encoder widths,
SDXL diffusers-named files share names with SD1 but not widths or depth. No name hit: unknown.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from lytools.arch.detect import SCALES, arch_from_metadata, shapes_of
from lytools.arch.keymap import NETWORK_ARCHS, alias_table
from lytools.errors import LytoolsError

Shape = tuple[int, ...]

# the LyCORIS/kohya suffixes of a LoRA module's tensors, which every key layout is read into
LORA_DOWN, LORA_UP, LORA_MID = "lora_down.weight", "lora_up.weight", "lora_mid.weight"
ALPHA, DORA_SCALE = "alpha", "dora_scale"

KOHYA_PREFIXES = (
    "lora_prior_unet_", "lora_prior_te_", "lora_transformer_", "lora_unet_", "lora_te1_", "lora_te2_",
    "lora_te3_", "lora_te_", "oft_unet_",
)
# dotted-layout suffixes (longest first) -> LyCORIS spelling
_DOTTED_SUFFIXES = (
    (".lora_linear_layer.down.weight", LORA_DOWN),
    (".lora_linear_layer.up.weight", LORA_UP),
    (".lora_A.default.weight", LORA_DOWN),
    (".lora_B.default.weight", LORA_UP),
    (".lora.down.weight", LORA_DOWN),
    (".lora.up.weight", LORA_UP),
    (".lora_A.weight", LORA_DOWN),
    (".lora_B.weight", LORA_UP),
    (".lora_B.bias", "lora_up.bias"),
    (".lora_magnitude_vector", DORA_SCALE),
    (".lora_down.weight", LORA_DOWN),
    (".lora_up.weight", LORA_UP),
    (".lora_mid.weight", LORA_MID),
    (".down.weight", LORA_DOWN),  # xlabs processor modules
    (".up.weight", LORA_UP),
)
_LYCORIS_SUFFIXES = (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "w_norm", "b_norm", "oft_blocks", "rescale", "on_input",
    "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight", ALPHA, DORA_SCALE,
)
# BFL's Flux control LoRAs (FLUX.1 Canny/Depth dev LoRA) carry whole q/k RMSNorm scales, which a loader
# sets (not adds), next to LoRA factors on BFL names and an img_in for a wider (control-image) input
_BFL_CONTROL_NORM = re.compile(r"(?:^|\.)(?:double_blocks\.\d+\.(?:img|txt)_attn\.norm|single_blocks\.\d+\.norm)\.(?:query|key)_norm\.scale$")
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora$")
_XLABS = re.compile(r"^double_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12])$")
# xlabs-style single-block processors (USO): `qkv_lora` is the q;k;v rows of linear1 (ComfyUI `linear1_qkv`)
_XLABS_SINGLE = re.compile(r"^single_blocks\.(\d+)\.processor\.(qkv|proj)_lora$")
# a CLIP text model's own module paths, saved with no component prefix (get_peft_model_state_dict of a text encoder)
BARE_CLIP = ("text_model.encoder.layers.", "encoder.layers.")
# diffusers' convert_state_dict_to_kohya of a transformers 5 CLIPTextModel: `lora_te1_encoder_layers_N_…`, no `text_model_`
_FLAT_CLIP_KOHYA = re.compile(r"^(lora_te[12]?_)(encoder_layers_\d+_.+)$")


def _processor_module(module: str) -> str:
    """Old diffusers attention-processor names -> module paths (`…attn1.processor.to_q_lora` -> `…attn1.to_q`)."""
    if _XLABS_SINGLE.match(module):
        return module
    found = _PROCESSOR.match(module)
    if found:
        sub = "to_out.0" if found.group(2) == "to_out" else found.group(2)
        return f"{found.group(1)}.{sub}"
    if module.endswith("_lora") and "." in module:  # text_encoder …self_attn.to_q_lora
        head, _, tail = module.rpartition(".")
        return f"{head}.{ {'to_q': 'q_proj', 'to_k': 'k_proj', 'to_v': 'v_proj', 'to_out': 'out_proj'}.get(tail[:-5], tail[:-5]) }"
    return module


_SUFFIX_MAP: dict[str, str] = {ending[1:]: suffix for ending, suffix in _DOTTED_SUFFIXES}
_SUFFIX_MAP.update({suffix: suffix for suffix in _LYCORIS_SUFFIXES})


def split_network_key(key: str) -> tuple[str, str] | None:
    """Return (module name, LyCORIS-spelled suffix) for a network key of any layout, or None."""
    if key.startswith(KOHYA_PREFIXES) or key.startswith("lycoris_"):
        name, dot, suffix = key.partition(".")
        return (name, suffix) if dot and suffix else None
    parts = key.split(".")
    for width in (3, 2, 1):  # longest known ending first: lora_linear_layer.down.weight ... alpha
        if len(parts) > width:
            suffix = _SUFFIX_MAP.get(".".join(parts[-width:]))
            if suffix is not None:
                return _processor_module(".".join(parts[:-width])), suffix
    if len(parts) >= 3 and parts[-1] == "weight":  # IA³ stores its vector as `<module>.weight`
        return ".".join(parts[:-1]), "weight"
    return None


def layout_of_module(name: str) -> str:
    """Return kohya | lycoris | diffusers | peft | comfy | xlabs | unknown for one module name."""
    if name.startswith("lycoris_"):
        return "lycoris"
    if name.startswith(KOHYA_PREFIXES):
        return "kohya"
    if name.startswith("base_model.model."):
        return "peft"
    if name.startswith(("diffusion_model.", "text_encoders.")):
        return "comfy"
    if _XLABS.match(name) or _XLABS_SINGLE.match(name):
        return "xlabs"
    if name.startswith(("unet.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "transformer.")):
        return "diffusers"
    if "." in name:
        return "diffusers"  # bare module paths (diffusers/peft single-component files)
    return "unknown"


def lookup_names(name: str) -> tuple[str, ...]:
    """Return the spellings to try in an alias table for a module name as stored in a file."""
    if name.startswith("base_model.model.") or name.startswith(BARE_CLIP):
        rest = name.removeprefix("base_model.model.")
        if rest.startswith("encoder.layers."):  # a CLIP adapter written against transformers 5's CLIPTextModel
            return (rest, "text_encoder." + rest, "text_encoder.text_model." + rest)
        return (rest, "text_encoder." + rest)
    component, dot, rest = name.partition(".")
    if dot and component.startswith("text_encoder") and rest.startswith("encoder.layers."):
        # diffusers' save_lora_weights of a transformers 5 CLIPTextModel (no `text_model.` level)
        return (name, f"{component}.text_model.{rest}")
    found = _FLAT_CLIP_KOHYA.match(name)
    if found:
        return (name, f"{found.group(1)}text_model_{found.group(2)}")
    found = _XLABS.match(name)
    if found:
        block, kind, side = found.groups()
        stream = "img" if side == "1" else "txt"
        return (f"lora_unet_double_blocks_{block}_{stream}_attn_{kind}",)
    if name.startswith("oft_unet_"):
        return ("lora_unet_" + name[len("oft_unet_"):],)
    return (name,)


@dataclass
class NetworkArch:
    """What a network file is: architecture, key layout, components and the modules found."""

    arch: str  # sd1 | sd2 | sdxl | sd3 | flux | unknown
    layout: str  # kohya | lycoris | diffusers | peft | comfy | xlabs | mixed | unknown
    layouts: dict[str, int] = field(default_factory=dict)  # modules per layout
    components: dict[str, int] = field(default_factory=dict)  # modules per component
    modules: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> {suffix: key}
    stray: list[str] = field(default_factory=list)
    matched: int = 0  # modules whose name and shape fit `arch`
    scale: int = 1
    notes: list[str] = field(default_factory=list)
    unsupported: str | None = None  # what the file is when lytools can read its header but not apply it
    # the architectures the modules fit equally well when no metadata picks one (arch is then unknown):
    # the commands that can be told which (convert --arch) say so in their own words
    tied: tuple[str, ...] = ()


def group_network_keys(names: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Return ({module: {suffix: key}}, stray keys) for keys of any layout."""
    modules: dict[str, dict[str, str]] = {}
    stray: list[str] = []
    for key in names:
        split = split_network_key(key)
        if split is None:
            stray.append(key)
            continue
        module, suffix = split
        modules.setdefault(module, {})[suffix] = key
    for module in list(modules):
        suffixes = set(modules[module])
        if suffixes <= {ALPHA, DORA_SCALE} or (suffixes == {"weight"} and layout_of_module(module) != "kohya"):
            stray.extend(modules.pop(module).values())
    return modules, stray


def module_shapes(keys: Mapping[str, str], shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """Return {suffix: shape} of one module; a peft `lora_magnitude_vector` ([out] linear, [1, out, 1, 1]
    conv) is given LyCORIS `dora_scale` orientation ([out, 1], [out, 1, 1, 1]), which it equals."""
    result: dict[str, Shape] = {}
    for suffix, key in keys.items():
        shape = tuple(shapes[key])
        if suffix == DORA_SCALE and key.endswith("lora_magnitude_vector"):
            if len(shape) == 1:
                shape = (shape[0], 1)
            elif len(shape) == 4 and shape[0] == 1:
                shape = (shape[1], 1, 1, 1)
        result[suffix] = shape
    return result


def module_io(suffixes: Mapping[str, Shape]) -> tuple[int, int] | None:
    """Return (out, flattened in) of a module's ΔW from its factor shapes, or None when unknown."""
    if LORA_UP in suffixes and LORA_DOWN in suffixes:
        up, down = suffixes[LORA_UP], suffixes[LORA_DOWN]
        kernel = suffixes[LORA_MID][2:] if LORA_MID in suffixes else down[2:]
        return up[0], down[1] * math.prod(kernel)
    if "hada_w1_a" in suffixes and "hada_w1_b" in suffixes and "hada_t1" not in suffixes:
        return suffixes["hada_w1_a"][0], math.prod(suffixes["hada_w1_b"][1:])
    if "diff" in suffixes and len(suffixes["diff"]) >= 2:
        shape = suffixes["diff"]
        return shape[0], math.prod(shape[1:])
    w1 = suffixes.get("lokr_w1")
    w2 = suffixes.get("lokr_w2")
    if w1 is None and "lokr_w1_a" in suffixes and "lokr_w1_b" in suffixes:
        w1 = (suffixes["lokr_w1_a"][0], suffixes["lokr_w1_b"][1])
    if w2 is None and "lokr_w2_a" in suffixes and "lokr_w2_b" in suffixes:
        w2 = (suffixes["lokr_w2_a"][0], math.prod(suffixes["lokr_w2_b"][1:]))
    if w1 is not None and w2 is not None and len(w1) >= 2 and len(w2) >= 2:
        return w1[0] * w2[0], w1[1] * math.prod(w2[1:])
    return None


@functools.lru_cache(maxsize=65536)
def _describe_io(name: str, items: tuple[tuple[str, Shape], ...]) -> tuple[int, int] | None:
    from lytools.algos import KNOWN_SUFFIXES, describe_shapes

    known = {suffix: shape for suffix, shape in items if suffix in KNOWN_SUFFIXES}
    try:
        info = describe_shapes(name, known)
    except LytoolsError:
        return None
    if not info.delta_shape or len(info.delta_shape) < 2:
        return None
    return info.delta_shape[0], math.prod(info.delta_shape[1:])


_PLAIN_LORA = frozenset({LORA_DOWN, LORA_UP, ALPHA})


def _io(name: str, suffixes: Mapping[str, Shape]) -> tuple[int, int] | None:
    """(out, flattened in) of a module: lytools.algos' reading of the factors, else module_io.

    Plain LoRA/LoCon modules, by far the most common, are read by module_io directly (the same
    answer), so detecting such a network needs neither lytools.algos nor torch."""
    if {LORA_DOWN, LORA_UP} <= suffixes.keys() <= _PLAIN_LORA:
        return module_io(suffixes)
    found = _describe_io(name, tuple(sorted(suffixes.items())))
    return found if found is not None else module_io(suffixes)


def _shrunk(dim: int, scale: int) -> int:
    return dim // scale if scale > 1 and dim % 64 == 0 else dim


def _fits(io: tuple[int, int | None], shape: Shape, scale: int) -> bool:
    """Whether a module's (out, flattened in) fits a target shape at a shrink scale; (dim, None),
    the one width of an IA3 vector or OFT blocks, fits the target's output or input width."""
    out, inp = io
    if len(shape) < 2:
        return False
    if inp is None:
        return out in (_shrunk(shape[0], scale), _shrunk(shape[1], scale))
    return out == _shrunk(shape[0], scale) and inp == _shrunk(shape[1], scale) * math.prod(shape[2:])


def _one_width(suffixes: Mapping[str, Shape]) -> tuple[int, None] | None:
    """(width, None) for modules whose factors give one width only: an IA3 vector (`weight`, its
    output or input), OFT/BOFT blocks ([..., n, b, b]: n·b outputs); else None."""
    vector = suffixes.get("weight")
    if vector is not None and len(vector) == 1:
        return vector[0], None
    for key in ("oft_blocks", "oft_diag"):
        blocks = suffixes.get(key)
        if blocks is not None and len(blocks) >= 3 and blocks[-1] == blocks[-2]:
            return blocks[-3] * blocks[-1], None
    return None


@functools.cache
def _tables() -> dict[str, dict]:
    return {arch: alias_table(arch) for arch in NETWORK_ARCHS}


def _score(modules: Mapping[str, Mapping[str, Shape]], arch: str) -> tuple[int, int, int, dict[str, int]]:
    """Return (shape hits, name hits, best scale, components) of the modules against `arch`."""
    table = _tables()[arch]
    hits: list[tuple[tuple[int, int] | None, Shape, str]] = []
    for module, suffixes in modules.items():
        names = lookup_names(module)
        if module.startswith("base_model.model.") or module.startswith(BARE_CLIP):  # may belong to any text encoder
            names += tuple(f"{component}.{names[0]}" for component in ("text_encoder_2", "text_encoder_3"))
        targets = [table[n] for n in names if n in table]
        if not targets:
            continue
        io = _io(module, suffixes) or _one_width(suffixes)
        # the spelling whose shape fits (SDXL's te1 and te2 share their layer paths), else the first
        target = next((t for t in targets if io is not None and any(_fits(io, t.shape, s) for s in SCALES)), targets[0])
        hits.append((io, target.shape, target.component))
    best_scale, best = 1, -1
    measurable = sum(1 for io, _, _ in hits if io is not None)
    for scale in SCALES:
        count = sum(1 for io, shape, _ in hits if io is not None and _fits(io, shape, scale))
        if count > best:
            best_scale, best = scale, count
        if best == measurable:  # every module fits: no other scale can do better (real files: scale 1)
            break
    components: dict[str, int] = {}
    for _, _, component in hits:
        components[component] = components.get(component, 0) + 1
    return max(best, 0), len(hits), best_scale, components


# a claimed architecture -> the one whose module names its networks use (Chroma, a pruned Flux: Flux's)
_NAMES_OF = {"chroma": "flux"}


def detect_network(tensors: Any, metadata: Mapping[str, str] | None = None) -> NetworkArch:
    """Return the architecture, layout and modules of a network file from its header."""
    shapes = shapes_of(tensors)
    modules_keys, stray = group_network_keys(list(shapes))
    result = NetworkArch("unknown", "unknown", modules=modules_keys, stray=stray)
    if not modules_keys:
        result.notes.append("no network modules found")
        return result
    for module in modules_keys:
        layout = layout_of_module(module)
        result.layouts[layout] = result.layouts.get(layout, 0) + 1
    known = {k: v for k, v in result.layouts.items() if k != "unknown"}
    if len(known) == 1:
        result.layout = next(iter(known))
    elif len(known) > 1:
        result.layout = "mixed"
        result.notes.append("mixed key layouts: " + ", ".join(f"{k} {v}" for k, v in sorted(known.items())))
    prior = sum(1 for module in modules_keys if module.startswith(("lora_prior_unet_", "lora_prior_te_")))
    if prior:
        result.notes.append(f"{prior} Stable Cascade modules (lora_prior_*): an architecture lytools does not support")
    bundled = {key.split(".")[1] for key in stray if key.startswith("bundle_emb.") and key.count(".") >= 2}
    if bundled:
        result.notes.append(f"{len(bundled)} bundled textual-inversion embeddings (bundle_emb.*), kept as stray keys")
    norms = [key for key in stray if _BFL_CONTROL_NORM.search(key)]
    if norms:
        result.unsupported = (
            f"a BFL Flux control LoRA (FLUX.1 Canny/Depth style: {len(norms)} q/k norm scales that replace the model's "
            "and an img_in for the wider control input), which lytools cannot merge or convert; ComfyUI and diffusers load it"
        )
        result.notes.append(result.unsupported)
    by_module = {m: module_shapes(suffixes, shapes) for m, suffixes in modules_keys.items()}
    scores = {arch: _score(by_module, arch) for arch in NETWORK_ARCHS}
    ranked = sorted(scores.items(), key=lambda item: (item[1][0], item[1][1]), reverse=True)
    best_arch, (shape_hits, name_hits, scale, components) = ranked[0]
    claimed = arch_from_metadata(metadata or {})
    named = _NAMES_OF.get(claimed, claimed)
    if name_hits == 0:
        result.notes.append("no module name matches a known architecture")
        return result
    tied = [arch for arch, score in ranked if score[:2] == (shape_hits, name_hits)]
    if len(tied) > 1:
        if named in tied:
            best_arch = named
            shape_hits, name_hits, scale, components = scores[named]
        else:
            result.tied = tuple(tied)
            result.notes.append("modules fit " + " and ".join(tied) + " equally")
            return result
    result.arch, result.matched, result.scale = best_arch, shape_hits, scale
    result.components = components
    unmatched = len(modules_keys) - name_hits
    if unmatched:
        result.notes.append(f"{unmatched} module names are not in the {best_arch} tables (full-preset or foreign)")
    if claimed and named != best_arch:
        result.notes.append(f"metadata says {claimed} but the shapes fit {best_arch}; trusting the shapes")
    return result
