"""Read a network file of any supported layout into canonical kohya/LyCORIS modules (FORMATS.md 3, 4, 7).

Layouts: kohya/LyCORIS (`lora_unet_`, `lora_te*_`, `lycoris_`, OneTrainer `lora_transformer_`,
`oft_unet_`), diffusers (`unet.`/`text_encoder*.`/`transformer.` + `lora_A`/`lora_B` or
`lora.down`/`lora.up`, `.alpha` network alphas, `lora_adapter_metadata`), peft
(`base_model.model.…` + adapter_config.json), ComfyUI-native (`diffusion_model.`,
`text_encoders.`), old diffusers attention processors, xlabs Flux. Names are resolved through
lytools.arch's tables; the effective scale is kept (alpha tensors carried, or created from the
peft/diffusers config), split q/k/v parts are fused exactly into their kohya module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from lytools.algos import NetworkModule, describe_shapes
from lytools.arch.detect import SCALES
from lytools.arch.network import layout_of_module
from lytools.convert import names
from lytools.convert.fuse import (ALPHA, BIAS, DORA, DOWN, UP, alpha_tensor, fuse_parts, halves_swap_applies, scale_of,
                                  swap_halves)
from lytools.errors import FileFormatError, LytoolsError, NetworkError, UnsupportedError
from lytools.io import open_file, read_header
from lytools.io.folders import peft_config_path

DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_PEFT_PREFIX = "base_model.model."


@dataclass
class Network:
    """A network in canonical names.

    modules: canonical kohya/LyCORIS module name -> NetworkModule (LyCORIS suffixes, CPU tensors
    that own their memory). stray: keys that belong to no module -> tensor. sources: canonical
    module -> the input keys it was built from (every input key is in exactly one module or in
    stray). unmapped: stored module names no table knows (kept under their stored name).
    """

    path: Path
    arch: str  # sd1 | sd2 | sdxl | sd3 | flux | unknown
    layout: str  # kohya | lycoris | diffusers | peft | comfy | xlabs | mixed | unknown
    modules: dict[str, NetworkModule]
    metadata: dict[str, str]
    stray: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    scale: int = 1  # shrink factor of synthetic test networks (1 for real files)
    peft_config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    data_sha256: str | None = None  # AutoV3 of the input (safetensors read whole), for provenance
    tied: tuple[str, ...] = ()  # the architectures the modules fit equally (arch unknown, none forced)

    def component_modules(self) -> dict[str, list[str]]:
        """Return {component: [canonical module names]} (component None: unknown)."""
        result: dict[str, list[str]] = {}
        for module in self.modules:
            result.setdefault(names.component_of(self.arch, module) or "unknown", []).append(module)
        return result


# -- peft / diffusers scale configuration ----------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"{path}: unreadable adapter config ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise FileFormatError(f"{path}: adapter config is not a JSON object")
    return value


def adapter_metadata(metadata: Mapping[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """Return {component: LoraConfig fields} from diffusers' `lora_adapter_metadata` (and the
    `<component>_lora_adapter_metadata` spelling of training scripts)."""
    configs: dict[str, dict[str, Any]] = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            flat = json.loads(raw)
        except ValueError:
            raise FileFormatError(f"{path}: lora_adapter_metadata is not JSON") from None
        for key, value in flat.items():
            component, dot, field_name = key.partition(".")
            if dot:
                configs.setdefault(component, {})[field_name] = value
    for key, raw in metadata.items():
        if key.endswith("_lora_adapter_metadata"):
            component = key[: -len("_lora_adapter_metadata")]
            try:
                configs.setdefault(component, {}).update(json.loads(raw))
            except ValueError:
                raise FileFormatError(f"{path}: {key} is not JSON") from None
    return configs


def _pattern_entry(patterns: Mapping[str, Any] | None, path: str) -> tuple[str | None, Any]:
    """peft's pattern rule (`get_pattern_key`): the first key, read as a regular expression, that
    matches the whole module path or a tail of it after a '.'; (None, None) when none does. A key
    that is not a valid expression (peft would stop on it) is matched as plain text."""
    for pattern, value in (patterns or {}).items():
        try:
            found = re.match(rf"(.*\.)?({pattern})$", path)
        except re.error:
            found = path == pattern or path.endswith("." + pattern)
        if found:
            return pattern, value
    return None, None


def config_scale(config: Mapping[str, Any], path: str, rank: int) -> float:
    """Return the peft scale of one module of rank `rank`: lora_alpha / r (rsLoRA: / sqrt(r)) with
    the patterns applied; LoHa/LoKr configs call it `alpha`.

    A pattern key can name more modules than its writer meant (a bare `proj_out` also matches every
    `single_transformer_blocks.N.proj_out` of Flux). When the rank_pattern key that matches this
    module gives another rank than the module has, the key was not written for it (peft could not
    even load the file): the alpha_pattern entry of that same key is not applied to it either."""
    rank_key, pattern_rank = _pattern_entry(config.get("rank_pattern"), path)
    alpha_key, alpha = _pattern_entry(config.get("alpha_pattern"), path)
    if alpha_key is not None and alpha_key == rank_key and pattern_rank != rank:
        alpha = None
    if alpha is None:
        key = "alpha" if str(config.get("peft_type", "")).upper() in ("LOHA", "LOKR") else "lora_alpha"
        alpha = config.get(key, 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise FileFormatError(f"adapter config: the alpha of module {path} is {json.dumps(alpha)}, not a number")
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


# -- the reader ------------------------------------------------------------------------------------
def _rank(name: str, tensors: Mapping[str, torch.Tensor]) -> int | None:
    """Return the rank of a rank-based module (LoRA, LoHa, LoKr) from its shapes, or None."""
    if DOWN in tensors:
        return int(tensors[DOWN].shape[0])
    try:
        info = describe_shapes(name, {s: tuple(t.shape) for s, t in tensors.items()})
    except LytoolsError:
        return None
    return info.rank if info.algo in ("loha", "lokr") else None


def _module_io(name: str, tensors: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    try:
        info = describe_shapes(name, {s: tuple(t.shape) for s, t in tensors.items() if s != ALPHA})
    except LytoolsError:
        return None
    if not info.delta_shape or len(info.delta_shape) < 2:
        return None
    return info.delta_shape[0], math.prod(info.delta_shape[1:])


def _fits(io: tuple[int, int] | None, shape: tuple[int, ...], scale: int) -> bool:
    if io is None or len(shape) < 2:
        return False
    shrunk = tuple(d // scale if scale > 1 and d % 64 == 0 else d for d in shape)
    return io == (shrunk[0], math.prod(shrunk[1:]))


def _diffusers_component(stored: str) -> tuple[str | None, str]:
    if stored.startswith(_PEFT_PREFIX):
        return None, stored[len(_PEFT_PREFIX):]
    component, dot, path = stored.partition(".")
    if dot and component in DIFFUSERS_COMPONENTS:
        return component, path
    return None, stored


def _magnitude_to_dora(name: str, tensors: dict[str, torch.Tensor]) -> None:
    """peft `lora_magnitude_vector` ([out] linear, [1, out, 1, 1] conv) -> `dora_scale` [out, 1(, 1, 1)]."""
    magnitude = tensors.get(DORA)
    down = tensors.get(DOWN)
    if magnitude is None or down is None:
        return
    out = tensors[UP].shape[0] if UP in tensors else magnitude.numel()
    if magnitude.numel() != out:
        raise NetworkError(f"module {name}: lora_magnitude_vector has {magnitude.numel()} values for {out} output rows")
    tail = (1,) * (down.dim() - 1)
    tensors[DORA] = magnitude.reshape((out,) + tail).clone()


_LORA_BIAS = "lora_up.bias"


def _lora_bias_to_diff(name: str, tensors: dict[str, torch.Tensor]) -> None:
    """peft's `lora_B.bias` (LoraConfig lora_bias=True) adds scale · b to the layer's bias (peft merges it
    so): kept as the LoRA module's bias difference `diff_b` with the scale applied."""
    if BIAS in tensors:
        raise NetworkError(f"module {name} holds both lora_B.bias and diff_b")
    bias = tensors.pop(_LORA_BIAS)
    down = tensors.get(DOWN)
    # (a rank-0 module is refused when it is described, with its name)
    scale = scale_of(name, tensors) if down is not None and down.shape[0] else 1.0
    tensors[BIAS] = bias if scale == 1.0 else (bias.float() * scale).to(bias.dtype)


WHOLE_READ_LIMIT = 4 << 30  # networks up to this size are read with one read() call


class _WholeFile:
    """A .safetensors file read with one read() into memory; tensors view that buffer (no copies).

    Networks are small and every tensor is needed, so one sequential read beats page faults on a
    memory map, and the data-section SHA-256 (AutoV3) comes from the same bytes.
    """

    def __init__(self, path: Path, hash_data: bool = True):
        self._header = read_header(path)  # validated: offsets tile the data, dtypes known
        self._hash_data = hash_data  # False: no data_sha256 (no provenance to record)
        self.path = path
        self.metadata = dict(self._header.metadata or {})
        self._infos = self._header.tensors
        self._start = self._header.data_start
        self._buffer: bytearray | None = None
        self.data_sha256: str | None = None

    def _read(self) -> bytearray:
        if self._buffer is None:
            size = self._header.file_size
            buffer = bytearray(size)
            with open(self.path, "rb") as handle:
                if handle.readinto(buffer) != size or handle.read(1):
                    raise FileFormatError(f"{self.path}: file changed while reading")
            if self._hash_data:
                self.data_sha256 = hashlib.sha256(memoryview(buffer)[self._start:]).hexdigest()
            self._buffer = buffer
        return self._buffer

    def __enter__(self) -> "_WholeFile":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def infos(self):
        return self._infos.values()

    def get(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        dtype = info.torch_dtype
        if dtype is None:
            raise FileFormatError(f"{self.path}: tensor {name} has dtype {info.dtype}, which torch cannot hold")
        begin = self._start + info.begin
        count = info.nbytes // dtype.itemsize
        shape = info.shape
        if info.dtype == "F4" and shape:  # two values per byte: torch halves the last dimension
            shape = shape[:-1] + (shape[-1] // 2,)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = self._read()
        if begin % dtype.itemsize:  # an unaligned old file: copy this tensor out
            flat = torch.frombuffer(bytearray(buffer[begin:begin + info.nbytes]), dtype=dtype)
        else:
            flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=begin)
        return flat.reshape(shape)


def _open_network(path: Path, hash_data: bool = True):
    """Return a reader for a network file: whole-file for .safetensors up to WHOLE_READ_LIMIT."""
    if path.name.lower().endswith(".safetensors") and path.is_file() and path.stat().st_size <= WHOLE_READ_LIMIT:
        return _WholeFile(path, hash_data), True
    return open_file(path), False


def load_network(path: str | os.PathLike, *, arch: str | None = None, config: Mapping[str, Any] | None = None,
                 hash_data: bool = True, reader: Any = None, keep_parts: bool = False) -> Network:
    """Return the network at `path` in canonical kohya/LyCORIS module names, whatever its layout.

    arch: force the architecture (sd1, sd2, sdxl, sd3, flux) when detection cannot tell.
    config: a peft LoraConfig dict for a peft adapter whose adapter_config.json is elsewhere.
    hash_data: False leaves `data_sha256` None (the input's AutoV3 is not computed: --strip-metadata).
    reader: `path` already open (lytools.io.open_file): read from it instead of opening the file again (a
    pickled file is then unpickled once); the caller closes it.
    keep_parts: q/k/v parts that do not fuse exactly into their kohya module (LoHa, LoKr, full, OFT parts, DoRA
    on some parts) are kept as modules of their own under their stored names instead of failing: merge into a
    checkpoint applies each to its own rows, as the diffusers model they were trained on has them as layers.
    Errors name the file: a module that is ambiguous or spelled twice, a broken diffusers config.
    """
    path = Path(path)
    try:
        return _load(path, arch, config, hash_data, reader, keep_parts)
    except (NetworkError, UnsupportedError) as exc:
        message = str(exc)
        if not message.startswith(str(path)):
            raise type(exc)(f"{path}: {message}") from None
        raise


def _load(path: Path, forced_arch: str | None, config: Mapping[str, Any] | None, hash_data: bool = True,
          reader: Any = None, keep_parts: bool = False) -> Network:
    opened, owned = (contextlib.nullcontext(reader), False) if reader is not None else _open_network(path, hash_data)
    with opened as source:
        infos = {info.name: info for info in source.infos()}
        metadata = dict(source.metadata or {})
        detected = names.detect_cached({name: info.shape for name, info in infos.items()}, metadata)
        arch = forced_arch or detected.arch
        network = Network(path, arch, detected.layout, {}, metadata, scale=detected.scale, notes=list(detected.notes),
                          tied=() if forced_arch else detected.tied)
        if not detected.modules:
            return network  # not a network (a checkpoint?): nothing read beyond the header; callers decide
        if detected.unsupported:
            raise UnsupportedError(f"{path}: {detected.unsupported}")

        def read(key: str) -> torch.Tensor:
            # whole-file tensors already own their (shared) buffer; map views must be copied out
            return source.get(key) if owned else source.get(key).clone()

        if forced_arch and forced_arch != detected.arch and detected.arch != "unknown":
            network.notes.append(f"detected {detected.arch}, read as {forced_arch} as asked")
        elif forced_arch and detected.tied:
            network.notes.append(f"read as {forced_arch} as asked")
        components = adapter_metadata(metadata, path)
        peft = dict(config) if config is not None else None
        if peft is None and detected.layout == "peft":
            config_file = peft_config_path(path)
            if config_file is not None:
                peft = _read_json(config_file)
        network.peft_config = peft
        for key in detected.stray:
            network.stray[key] = read(key)
        wholes: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
        parts: dict[str, list[tuple[str, tuple[int, int], dict[str, torch.Tensor]]]] = {}
        missing_config = False
        claims = _Claims()
        for stored, suffix_keys in detected.modules.items():
            tensors = {suffix: read(key) for suffix, key in suffix_keys.items()}
            layout = layout_of_module(stored)
            if "lora_magnitude_vector" in tensors:  # diffusers' kohya export keeps the peft name
                tensors[DORA] = tensors.pop("lora_magnitude_vector")
                _magnitude_to_dora(stored, tensors)
            if layout in ("diffusers", "peft"):
                _magnitude_to_dora(stored, tensors)
                rank = _rank(stored, tensors)
                if ALPHA not in tensors and rank is not None:
                    component, module_path = _diffusers_component(stored)
                    cfg = peft if layout == "peft" else components.get(component or "", None)
                    if cfg is None and layout == "peft":
                        missing_config = True
                    elif cfg is not None:
                        try:
                            scale = config_scale(cfg, module_path, rank)
                        except FileFormatError as exc:
                            raise FileFormatError(f"{path}: {exc}") from None
                        like = tensors.get(DOWN, next(iter(tensors.values())))
                        tensors[ALPHA] = alpha_tensor(scale * rank, like)
            if _LORA_BIAS in tensors:
                _lora_bias_to_diff(stored, tensors)
            canonical = _pick(arch, stored, tensors, network.scale)
            if canonical is None:
                module = names.comfy_generic(arch, stored) if layout == "comfy" else None
                if module is None:
                    if layout not in ("kohya", "lycoris"):
                        network.unmapped.append(stored)
                    module = stored
                claims.claim(module, stored, None)
                wholes[module] = (stored, tensors)
                continue
            claims.claim(canonical.module, stored, canonical)
            if canonical.module_rows is None:
                wholes[canonical.module] = (stored, tensors)
            else:
                part_scale = _part_scale(canonical, tensors, network.scale)
                rows = names.scale_rows(canonical.module_rows, part_scale)
                parts.setdefault(canonical.module, []).append((stored, rows, tensors, part_scale))
        if missing_config:
            network.notes.append(
                "peft adapter without adapter_config.json: read with scale 1 (lora_alpha = r); "
                "put its adapter_config.json beside it for peft's scale"
            )
        for module, (stored, tensors) in wholes.items():
            network.modules[module] = NetworkModule(module, tensors)
            network.sources[module] = sorted(detected.modules[stored].values())
        for module, pieces in parts.items():
            try:
                fused = _fuse(arch, module, pieces)
            except UnsupportedError:
                if not keep_parts:
                    raise
                for stored, _, tensors, _ in pieces:  # each part a module of its own, on its rows
                    network.modules[stored] = NetworkModule(stored, tensors)
                    network.sources[stored] = sorted(detected.modules[stored].values())
                continue
            network.modules[module] = NetworkModule(module, fused)
            network.sources[module] = sorted(k for stored, *_ in pieces for k in detected.modules[stored].values())
        network.data_sha256 = getattr(source, "data_sha256", None)
    return network


class _Claims:
    """Which stored module each canonical module is read from: a module spelled twice in one file (kohya and
    lycoris_ names, or kohya and diffusers paths of one layer) fails, since a loader would apply it twice."""

    def __init__(self) -> None:
        self.wholes: dict[str, str] = {}  # canonical module -> the stored module read as it
        self.parts: dict[str, str] = {}  # fused canonical module -> its first stored q/k/v part

    def claim(self, module: str, stored: str, canonical: names.Canonical | None) -> None:
        """Record `stored` as `module` (`canonical` None: a name no table knows, kept as stored)."""
        if canonical is None:
            if module in self.wholes:
                raise NetworkError(f"module {module} is stored twice")
            self.wholes[module] = stored
        elif canonical.module_rows is None:
            if module in self.wholes or module in self.parts:
                other = self.wholes.get(module) or self.parts[module]
                raise NetworkError(f"modules {other} and {stored} are both {module} (a file mixing two spellings)")
            self.wholes[module] = stored
        else:
            if module in self.wholes:
                raise NetworkError(f"module {stored} is a part of {module}, which the file also holds whole")
            self.parts.setdefault(module, stored)


def check_spelled_once(path: str | os.PathLike, modules: Mapping[str, Mapping[str, torch.Tensor]],
                       metadata: Mapping[str, str]) -> None:
    """Raise NetworkError naming `path` and both spellings when two of its stored modules (name -> {suffix:
    tensor}, only shapes are read) are one module of the architecture they fit: the check load_network makes,
    for callers that read kohya/LyCORIS files in place (resize)."""
    shapes = {f"{stored}.{suffix}": tuple(t.shape) for stored, tensors in modules.items() for suffix, t in tensors.items()}
    detected = names.detect_cached(shapes, metadata)
    claims = _Claims()
    try:
        for stored, tensors in modules.items():
            canonical = _choose(detected.arch, stored, tensors, detected.scale)
            claims.claim(stored if canonical is None else canonical.module, stored, canonical)
    except NetworkError as exc:
        raise NetworkError(f"{path}: {exc}") from None


def _pick(arch: str, stored: str, tensors: dict[str, torch.Tensor], scale: int) -> names.Canonical | None:
    """Return the canonical reading of a stored module; a module stored in diffusers' [scale; shift]
    row order gets its rows put back in kohya's [shift; scale] order in `tensors`."""
    canonical = _choose(arch, stored, tensors, scale)
    if canonical is not None and canonical.swap_halves and halves_swap_applies(tensors):
        tensors.update(swap_halves(stored, tensors))
    return canonical


def _choose(arch: str, stored: str, tensors: Mapping[str, torch.Tensor], scale: int) -> names.Canonical | None:
    found = names.candidates(arch, stored)
    if not found and arch in ("sd1", "sd2") and stored.startswith("lora_te1_"):
        found = names.candidates(arch, "lora_te_" + stored[len("lora_te1_"):])  # diffusers' kohya export (quirk 4)
    if len(found) <= 1:
        return found[0] if found else None
    io = _module_io(stored, tensors)
    for trial in (scale, *SCALES):
        fitting = [c for c in found if _fits(io, c.shape, trial)]
        if fitting:
            return fitting[0]
    return found[0]


def _part_scale(canonical: names.Canonical, tensors: Mapping[str, torch.Tensor], scale: int) -> int:
    """Return the shrink factor of one stored part: its rows in the table over its rows on disk."""
    up = tensors.get(UP)
    full = canonical.module_rows[1] - canonical.module_rows[0]
    if up is not None and up.shape[0] and full % up.shape[0] == 0:
        return full // up.shape[0]
    return scale


def _fuse(arch: str, module: str, pieces) -> dict[str, torch.Tensor]:
    full = names.full_shape(arch, module)
    if full is None:
        raise NetworkError(f"module {module}: q/k/v parts of an unknown fused module")
    scales = {scale for *_, scale in pieces}
    if len(scales) != 1:
        raise NetworkError(f"module {module}: its q/k/v parts disagree on the layer width")
    scale = scales.pop()
    total = full[0] // scale if scale > 1 and full[0] % scale == 0 else full[0]
    seen: dict[tuple[int, int], str] = {}
    for stored, rows, _, _ in pieces:
        if rows in seen:
            raise NetworkError(f"modules {seen[rows]} and {stored} are the same part of {module}")
        seen[rows] = stored
    return fuse_parts(module, [(rows, tensors) for _, rows, tensors, _ in pieces], total)
