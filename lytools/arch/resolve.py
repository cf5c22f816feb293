"""Resolve network module names against one real checkpoint (FORMATS.md 4.6).

`Resolver(checkpoint_header)` detects the checkpoint, then answers `resolve(name)` for any accepted
spelling of a module name with the actual key(s) in that file, whatever its wrapper prefix
(`model.diffusion_model.`, `diffusion_model.`, none) or layout (LDM/SGM/BFL/MMDiT single file, or a
diffusers UNet/transformer file), with row ranges scaled to the file's real fused shapes.

Lookup order:
1. the architecture's alias table (kohya tables from the manifests and every accepted spelling,
   see keymap.alias_table), translated to this file's keys;
2. a table built from the file's own keys, so that LyCORIS full-preset names outside the kohya
   tables resolve (`lora_unet_conv_in`, `lora_unet_time_embedding_linear_1`, `…_norm1`,
   `lora_te_text_model_final_layer_norm`): for sd1/sd2/sdxl UNets through the diffusers-names
   manifest (every UNet module), for text encoders through the HF <-> open_clip rules;
3. the generic table, for every architecture including unknown ones: each `<path>.weight` key of
   the file gives `lora_unet_<path with . -> _>` (path = key without the denoiser wrapper prefix),
   `<key without .weight>` and `diffusion_model.<path>` (ComfyUI-native). Text-encoder keys give
   `lora_te{,1,2,3}_<HF path with . -> _>`.
A name that two different keys claim is dropped from a table rather than guessed; a name with no
hit resolves to None (callers report it). A modulation diffusers stores as [scale; shift] (keymap
DiffusersTarget.swap_halves) named in the other order than the file holds it resolves to two
placements on the same key, its halves crossed, so every consumer of placements swaps it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from lytools.arch.detect import CheckpointArch, detect_checkpoint, shapes_of
from lytools.arch.keymap import (
    ENCODERS,
    NETWORK_ARCHS,
    UNET_PREFIX,
    CanonicalTarget,
    Rows,
    alias_table,
    diffusers_table,
    kind_of,
    openclip_to_hf,
)
from lytools.arch.manifests import checkpoint_manifest, diffusers_names
from lytools.arch.network import lookup_names

Shape = tuple[int, ...]
# the first level of a CLIP text model's keys once transformers 5 dropped `text_model.` from CLIPTextModel
_FLAT_CLIP = ("encoder.layers.", "embeddings.", "final_layer_norm.")


@dataclass(frozen=True)
class Placement:
    """One tensor a module writes into.

    key: the checkpoint key. rows: rows [start, stop) of that tensor the piece covers (None: whole).
    module_rows: rows of the module's ΔW that land there (None: all of it).
    """

    key: str
    rows: Rows | None = None
    module_rows: Rows | None = None


@dataclass(frozen=True)
class Resolved:
    """A network module name resolved to a given checkpoint."""

    name: str  # the name asked for
    # canonical kohya module name (or the generic lora_unet_ name); for a q/k/v/mlp part of a fused
    # kohya module (diffusers Flux/SD3 names) the fused module, with the part's rows in placements
    module: str
    shape: Shape  # ΔW shape of the module in this checkpoint
    kind: str
    component: str  # unet | te | te1 | te2 | te3
    placements: tuple[Placement, ...]
    in_table: bool  # False: found through the file's own keys (generic / full-preset name)

    @property
    def key(self) -> str:
        """The single target key (first placement's key for split targets)."""
        return self.placements[0].key

    @property
    def rows(self) -> Rows | None:
        return self.placements[0].rows if len(self.placements) == 1 else None


def _halves_swapped(key: str, rows: Rows | None, length: int) -> tuple[Placement, ...] | None:
    """Return the two placements of a module whose ΔW holds `key`'s rows with their halves exchanged:
    ΔW rows [0, h) land on the second half of the rows, [h, 2h) on the first (diffusers stores an
    adaLN modulation as [scale; shift] where SD3/BFL store [shift; scale]). None for odd rows."""
    if length % 2:
        return None
    start, half = (rows[0] if rows else 0), length // 2
    return (Placement(key, (start + half, start + length), (0, half)),
            Placement(key, (start, start + half), (half, length)))


def _two_chunks(length: int, shape: Shape) -> bool:
    """True for a [shift; scale] modulation (2·width rows): the swapped ones are those (the final
    layer's, a pre-only SD3 context block's); SD3.5 large's block 23 is a full 6-chunk block."""
    return len(shape) == 2 and length == 2 * shape[1]


def _scale_rows(rows: Rows | None, full: int, actual: int) -> Rows | None:
    if rows is None or full == actual:
        return rows
    if actual <= 0 or full % actual:
        return None
    factor = full // actual
    return (rows[0] // factor, rows[1] // factor)


class Resolver:
    """Maps network module names to keys (and rows) of one checkpoint; see the module docstring."""

    def __init__(self, tensors: Any, metadata: Mapping[str, str] | None = None, arch: str | None = None):
        self.shapes: dict[str, Shape] = shapes_of(tensors)
        self.checkpoint: CheckpointArch = detect_checkpoint(self.shapes, metadata)
        self.arch = arch or self.checkpoint.arch
        self.prefix = self.checkpoint.prefix if self.checkpoint.prefix is not None else self._infer_prefix()
        self._aliases = alias_table(self.arch) if self.arch in NETWORK_ARCHS else {}
        self._full_shapes: dict[str, Shape] = {}
        if self.arch in NETWORK_ARCHS:
            self._full_shapes = {k: tuple(v[0]) for k, v in checkpoint_manifest(self.arch)["tensors"].items()}
        self._to_diffusers = self._diffusers_key_map() if self.checkpoint.layout == "diffusers" else {}
        self._old_te = self._old_text_encoder_names()
        self._own = self._own_table()

    def _infer_prefix(self) -> str:
        """Denoiser prefix when detection found none (arch given by the caller): the best key overlap."""
        if self.arch not in NETWORK_ARCHS:
            return UNET_PREFIX
        from lytools.arch.detect import DENOISER_PREFIXES
        from lytools.arch.keymap import module_table

        rels = [t.key[len(UNET_PREFIX):] for t in module_table(self.arch).values() if t.key.startswith(UNET_PREFIX)]
        best, best_hits = UNET_PREFIX, 0
        for prefix in DENOISER_PREFIXES:
            hits = sum(1 for rel in rels if prefix + rel in self.shapes)
            if hits > best_hits:
                best, best_hits = prefix, hits
        return best

    # -- canonical key -> this file ----------------------------------------------------------
    def _diffusers_key_map(self) -> dict[str, list[tuple[str, Rows | None, bool]]]:
        """canonical key -> [(diffusers module name without component, rows of the canonical key,
        halves swapped)]."""
        mapping: dict[str, list[tuple[str, Rows | None, bool]]] = {}
        if self.arch not in NETWORK_ARCHS:
            return mapping
        for name, entry in diffusers_table(self.arch).items():
            component, _, path = name.partition(".")
            if component not in ("unet", "transformer"):
                continue
            mapping.setdefault(entry.key, []).append((path, entry.key_rows, entry.swap_halves))
        return mapping

    def _old_text_encoder_names(self) -> dict[str, str]:
        if self.arch != "sd1":
            return {}
        aliases = checkpoint_manifest("sd1").get("aliases", {})
        return {new: old for old, new in aliases.items() if old in self.shapes}

    def _placements(self, target: CanonicalTarget) -> tuple[Placement, ...] | None:
        key = target.key
        if key.startswith(UNET_PREFIX):
            rel = key[len(UNET_PREFIX):]
            if self.checkpoint.layout == "diffusers":
                return self._diffusers_placements(target)
            actual = self.prefix + rel
        else:
            actual = key if key in self.shapes else self._old_te.get(key, key)
        shape = self.shapes.get(actual)
        if shape is None:
            return None
        rows = target.rows
        if rows is not None:
            full = self._full_shapes.get(key, shape)
            rows = _scale_rows(rows, full[0], shape[0])
            if rows is None:
                return None
        length = rows[1] - rows[0] if rows else shape[0]
        if target.swap_halves and _two_chunks(length, shape):
            return _halves_swapped(actual, rows, length)
        return (Placement(actual, rows, None),)

    def _diffusers_placements(self, target: CanonicalTarget) -> tuple[Placement, ...] | None:
        pieces = self._to_diffusers.get(target.key)
        if not pieces:
            return None
        full = self._full_shapes.get(target.key)
        placements: list[Placement] = []
        want = target.rows
        for path, rows, swapped in pieces:
            actual = self.prefix + path + ".weight"
            shape = self.shapes.get(actual)
            if shape is None:
                return None
            if rows is None:
                # the diffusers module is the whole canonical tensor (halves swapped when exactly
                # one of the name and the file uses diffusers' [scale; shift] order)
                if swapped != target.swap_halves and _two_chunks(shape[0], shape):
                    return _halves_swapped(actual, None, shape[0]) if want is None else None
                if want is None:
                    return (Placement(actual, None, None),)
                if full is None:
                    return None
                return (Placement(actual, _scale_rows(want, full[0], shape[0]), None),)
            if want is not None and (rows[1] <= want[0] or rows[0] >= want[1]):
                continue
            start = want[0] if want is not None else 0
            module_rows = (rows[0] - start, rows[1] - start)
            piece_full = rows[1] - rows[0]
            if want is not None and rows == want:
                placements.append(Placement(actual, None, None))
            else:
                placements.append(Placement(actual, None, _scale_rows(module_rows, piece_full, shape[0])))
        placements.sort(key=lambda p: (p.module_rows or (0, 0))[0])
        return tuple(placements) or None

    def _actual_shape(self, target: CanonicalTarget, placements: tuple[Placement, ...]) -> Shape:
        if len(placements) == 1 and placements[0].module_rows is None:
            shape = self.shapes[placements[0].key]
            rows = placements[0].rows
            if rows is not None:
                return (rows[1] - rows[0],) + shape[1:]
            return shape
        rows_total = 0
        rest: Shape = ()
        for placement in placements:
            shape = self.shapes[placement.key]
            rows_total += placement.rows[1] - placement.rows[0] if placement.rows else shape[0]
            rest = shape[1:]
        return (rows_total,) + rest

    # -- tables from this file's keys -------------------------------------------------------------
    def _component_of(self, key: str) -> tuple[str, str, str, str] | None:
        """Return (component, kohya prefix, path, naming style) for a text-encoder key, or None.

        A diffusers-layout file (a diffusers folder read as one file) holds each text encoder under
        its pipeline component (`text_encoder.`, `text_encoder_2.`, ...) in transformers names."""
        if self.arch not in ENCODERS:
            return None
        for encoder in ENCODERS[self.arch]:
            if encoder.component == "unet":
                continue
            if key.startswith(encoder.key_prefix):
                return encoder.component, encoder.kohya_prefix, key[len(encoder.key_prefix):], encoder.style
            folder_prefix = encoder.diffusers + "."
            if self.checkpoint.layout == "diffusers" and key.startswith(folder_prefix):
                style = "t5" if encoder.style == "t5" else "hf"
                path = key[len(folder_prefix):]
                if style == "hf" and path.startswith(_FLAT_CLIP):
                    # transformers 5 saves CLIPTextModel without its `text_model.` level; kohya names keep it
                    path = "text_model." + path
                return encoder.component, encoder.kohya_prefix, path, style
        return None

    def _own_table(self) -> dict[str, tuple[str, Placement, Shape, str]]:
        """name -> (module, placement, shape, component) from this file's own keys."""
        table: dict[str, tuple[str, Placement, Shape, str]] = {}
        ambiguous: set[str] = set()

        def add(name: str, module: str, placement: Placement, shape: Shape, component: str) -> None:
            if name in ambiguous:
                return
            old = table.get(name)
            if old is not None and (old[1].key, old[1].rows) != (placement.key, placement.rows):
                del table[name]
                ambiguous.add(name)
                return
            table.setdefault(name, (module, placement, shape, component))

        prefix = self.checkpoint.prefix
        # 2. full-preset names through the diffusers-names manifest (every UNet module)
        if self.arch in ("sd1", "sd2", "sdxl") and prefix is not None:
            source = diffusers_names("sdxl" if self.arch == "sdxl" else "sd1")["modules"]
            for diffusers, entry in source.items():
                if not diffusers.startswith("unet."):
                    continue
                path = diffusers[len("unet."):]
                if self.checkpoint.layout == "diffusers":
                    actual = prefix + path + ".weight"
                else:
                    actual = prefix + entry["key"][len(UNET_PREFIX):]
                shape = self.shapes.get(actual)
                if shape is None:
                    continue
                module = "lora_unet_" + path.replace(".", "_")
                for name in (module, "lycoris_" + path.replace(".", "_"), diffusers, path):
                    add(name, module, Placement(actual), shape, "unet")
        # text encoders: HF paths (open_clip keys through the HF <-> open_clip rules)
        for key, shape in self.shapes.items():
            found = self._component_of(key)
            if found is None:
                continue
            component, kohya_prefix, rel, style = found
            encoder = next(e for e in ENCODERS[self.arch] if e.component == component)
            if style == "openclip":
                for hf_path, _ in openclip_to_hf(rel):
                    rows = None
                    if rel.endswith("attn.in_proj_weight"):
                        index = "qkv".index(hf_path[-6])
                        third = shape[0] // 3
                        rows = (index * third, (index + 1) * third)
                    piece_shape = shape if rows is None else (rows[1] - rows[0],) + shape[1:]
                    module = kohya_prefix + hf_path.replace(".", "_")
                    for name in (module, f"{encoder.diffusers}.{hf_path}", encoder.comfy + hf_path):
                        add(name, module, Placement(key, rows), piece_shape, component)
            elif rel.endswith(".weight"):
                path = rel[: -len(".weight")]
                module = kohya_prefix + path.replace(".", "_")
                for name in (module, f"{encoder.diffusers}.{path}", encoder.comfy + path):
                    add(name, module, Placement(key), shape, component)
        # 3. generic: every `.weight` key of the file
        if prefix is None:  # no known denoiser: still strip a ComfyUI/LDM wrapper prefix
            prefix = next((p for p in ("model.diffusion_model.", "diffusion_model.") if any(k.startswith(p) for k in self.shapes)), None)
        for key, shape in self.shapes.items():
            if not key.endswith(".weight"):
                continue
            base = key[: -len(".weight")]
            encoder_part = self._component_of(key)
            component = encoder_part[0] if encoder_part else "unet"
            add(base, "lora_unet_" + base.replace(".", "_"), Placement(key), shape, component)
            if prefix is not None and key.startswith(prefix):
                path = base[len(prefix):]
                module = "lora_unet_" + path.replace(".", "_")
                add(module, module, Placement(key), shape, "unet")
                add("diffusion_model." + path, module, Placement(key), shape, "unet")
            elif prefix is None and encoder_part is None:
                module = "lora_unet_" + base.replace(".", "_")
                add(module, module, Placement(key), shape, "unet")
        return table

    # -- the public question ------------------------------------------------------------------------
    def resolve(self, name: str) -> Resolved | None:
        """Return where module `name` lands in this checkpoint, or None when nothing matches.
        Other spellings of a stored name are tried too (a peft `base_model.model.` path, xlabs names)."""
        found = self._resolve_one(name)
        if found is None:
            for spelling in lookup_names(name):
                if spelling != name:
                    found = self._resolve_one(spelling)
                    if found is not None:
                        return replace(found, name=name)
        return found

    def _resolve_one(self, name: str) -> Resolved | None:
        target = self._aliases.get(name)
        if target is not None:
            placements = self._placements(target)
            if placements is not None:
                shape = self._actual_shape(target, placements)
                return Resolved(name, target.module, shape, target.kind, target.component, placements, target.in_table)
        own = self._own.get(name)
        if own is not None:
            module, placement, shape, component = own
            if placement.rows is not None:
                shape = (placement.rows[1] - placement.rows[0],) + tuple(self.shapes[placement.key][1:])
            return Resolved(name, module, tuple(shape), kind_of(tuple(shape)), component, (placement,), False)
        return None

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None
