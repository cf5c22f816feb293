"""What a model file is, from its header: `lytools info` (spec: CLI.md; FORMATS.md 2, 3, 5).

`inspect_file(path)` returns a JSON-ready dict; `format_report(report)` renders it for people.
Header-only: names, shapes, dtypes and metadata come from the header; the only tensor data read
are the 0-d `alpha` and `on_input` scalars of network modules (a few bytes each: scales cannot be
told otherwise) and the factors of rank-1 modules shaped like the zero modules that complete OpenCLIP
attention layers for AUTOMATIC1111 (a few KB each: only their values tell them from trained ones). Hashes (`hashes=True`) read the whole file once, streaming. Pickled checkpoints
(.ckpt/.pt) have no header: they are loaded with weights-only unpickling (memory-mapped).
"""

from __future__ import annotations

import hashlib
import re
import statistics
import struct
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

from lytools.arch import detect_checkpoint, detect_network
from lytools.arch.network import NetworkArch, module_shapes
from lytools.errors import LytoolsError, print_debug_traceback
from lytools.io import PickledFile, SafetensorsFile, ShardedFile, open_file
from lytools.io.folders import DiffusersFolder, lone_shard
from lytools.io.hashes import LEGACY_LENGTH, LEGACY_OFFSET, file_hashes
from lytools.io.metadata import REVEALING_KEYS, revealing
from lytools.io.writer import LegacyWindow, build_header, file_order, plan_entry, ss_only

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
SS_SHOWN = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
    "ss_v2", "ss_v_parameterization", "ss_output_name", "ss_sd_model_name", "ss_training_comment", "ss_epoch",
    "ss_steps", "ss_learning_rate", "ss_resolution", "ss_clip_skip",
)
VALUE_LIMIT = 200
_BLOCK = re.compile(
    r"(input_blocks|output_blocks|down_blocks|up_blocks|double_blocks|single_transformer_blocks|single_blocks|"
    r"joint_blocks|transformer_blocks|resblocks|layers|block)[._](\d+)|(mid_block|middle_block)"
)
_COMPONENT = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te3|lora_te|lora_transformer|oft_unet|lycoris|lora_prior_unet|lora_prior_te)_")


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(float(value), 6)


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def block_of(module: str) -> str:
    """Return a `component:block` label for per-block summaries (`unet:down_blocks_1`, `te:layers_3`)."""
    found = _COMPONENT.match(module)
    if found:
        component = found.group(1).replace("lora_", "").replace("_unet", "") or "unet"
        component = {"transformer": "unet", "oft": "unet", "lycoris": "unet"}.get(component, component)
    else:
        head = module.split(".", 1)[0]
        component = {"base_model": "model", "diffusion_model": "unet", "transformer": "unet"}.get(head, head)
    block = _BLOCK.search(module)
    if block is None:
        return f"{component}:other"
    if block.group(3):
        return f"{component}:mid"
    return f"{component}:{block.group(1)}_{block.group(2)}"


def _components_by_name(modules: Mapping[str, Any]) -> dict[str, int]:
    """Module counts per component from the name prefixes alone (for architectures lytools does not know)."""
    counts: Counter[str] = Counter(block_of(name).split(":", 1)[0] for name in modules)
    return dict(counts)


def _adapter_configs(path: Path, metadata: Mapping[str, str], layout: str) -> tuple[dict[str, Any], list[str]]:
    """Return ({component: LoraConfig fields} ("" for a peft adapter's adapter_config.json), notes): where a
    diffusers/peft file keeps its scale (FORMATS.md 3.3). diffusers writes `lora_adapter_metadata` flat,
    `<component>.<field>`; training scripts `<component>_lora_adapter_metadata`."""
    import json

    from lytools.convert.load import adapter_metadata
    from lytools.io.folders import peft_config_path

    try:
        configs: dict[str, Any] = dict(adapter_metadata(metadata, path))
    except LytoolsError as exc:
        return {}, [str(exc).removeprefix(f"{path}: ")]
    sibling = peft_config_path(path) if layout == "peft" else None
    if sibling is not None:
        try:
            configs[""] = json.loads(sibling.read_text())
        except (OSError, ValueError):
            return {}, [f"{sibling.name} next to the file is not readable JSON"]
    notes = []
    for component, entry in configs.items():
        if isinstance(entry, dict) and "r" in entry:
            if component == "" and sibling is not None:
                where = sibling.name
            elif f"{component}_lora_adapter_metadata" in metadata:
                where = f"{component}_lora_adapter_metadata"
            else:
                where = f"lora_adapter_metadata {component}"
            notes.append(f"{where}: r={entry.get('r')}, lora_alpha={entry.get('lora_alpha')}"
                         + (", rank/alpha patterns" if entry.get("rank_pattern") or entry.get("alpha_pattern") else ""))
    if not configs:
        notes.append("no alpha tensors and no adapter config: loaders assume the scale is folded in (peft alone defaults lora_alpha to 8)")
    return configs, notes


def _config_scale(configs: Mapping[str, Any], module: str, rank: int) -> float | None:
    """Return the peft scale of a diffusers/peft module without an alpha tensor from its adapter config, or None."""
    from lytools.convert.load import config_scale

    if module.startswith("base_model.model."):
        config, path = configs.get(""), module[len("base_model.model."):]
    else:
        component, _, path = module.partition(".")
        config = configs.get(component)
    if not isinstance(config, dict):
        return None
    try:
        return config_scale(config, path, rank)
    except LytoolsError:
        return None


def detection_metadata(handle) -> dict[str, str]:
    """The file's metadata for architecture detection, plus what a diffusers folder says elsewhere: its
    scheduler/scheduler_config.json `prediction_type` (epsilon | v_prediction) is the folder's own record
    of the prediction type (FORMATS.md 2.2: take it from metadata, never from the weights)."""
    import json

    metadata = dict(handle.metadata or {})
    if isinstance(handle, DiffusersFolder) and "modelspec.prediction_type" not in metadata:
        try:
            value = json.loads((handle.path / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type")
        except (OSError, ValueError, AttributeError):
            value = None
        if value in ("epsilon", "v_prediction"):
            metadata["modelspec.prediction_type"] = value
    return metadata


def _metadata_summary(metadata: Mapping[str, str]) -> dict[str, Any]:
    ss = {k: metadata[k] for k in SS_SHOWN if k in metadata}
    other_ss = sorted(k for k in metadata if k.startswith("ss_") and k not in ss)
    modelspec = {k: v for k, v in metadata.items() if k.startswith("modelspec.")}
    other = {k: v for k, v in metadata.items() if not k.startswith(("ss_", "modelspec."))}
    truncated: list[str] = []

    def clip(values: dict[str, str]) -> dict[str, str]:
        result = {}
        for key, value in values.items():
            if len(value) > VALUE_LIMIT:
                truncated.append(key)
                value = value[:VALUE_LIMIT] + f"… ({len(value)} chars)"
            result[key] = value
        return result

    return {
        "count": len(metadata),
        "revealing": revealing(metadata),  # dataset folders, captions, file names (--strip-metadata drops them)
        "ss": clip(ss),
        "ss_other_keys": other_ss,
        "modelspec": clip(modelspec),
        "other": clip(other),
        "truncated": truncated,
    }


_STRUCT = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


def _read_scalar(handle, key: str) -> float | None:
    """Return the first value of a tiny tensor (alpha, on_input): a few bytes, no torch tensor built."""
    info = handle.info(key)
    if info.numel < 1:
        return None
    if isinstance(handle, SafetensorsFile) and (info.dtype in _STRUCT or info.dtype == "BF16"):
        raw = bytes(handle.raw_bytes(key)[:8])
        if info.dtype == "BF16":
            return struct.unpack("<f", b"\0\0" + raw[:2])[0]
        return float(struct.unpack_from(_STRUCT[info.dtype], raw)[0])
    try:
        tensor = handle.get(key)
    except LytoolsError:
        return None
    return float(tensor.detach().flatten()[0].float())


def _target_kind(arch: str, module: str) -> str | None:
    """The kind (linear, conv3x3, conv1x1, norm) of the layer `module` names in `arch`, if known. For a
    network of unknown architecture: the kind every architecture naming such a module agrees on
    (`..._resnets_0_conv1` is a 3x3 conv in all of them; SD1's 1x1 `proj_in` is linear in SD2)."""
    from lytools.arch import alias_table
    from lytools.arch.keymap import NETWORK_ARCHS
    from lytools.arch.network import lookup_names

    kinds = set()
    for candidate in ((arch,) if arch in NETWORK_ARCHS else NETWORK_ARCHS):
        table = alias_table(candidate)
        target = next((table[name] for name in lookup_names(module) if name in table), None)
        if target is not None:
            kinds.add(target.kind)
    return kinds.pop() if len(kinds) == 1 else None


def _all_zero(handle, key: str) -> bool:
    try:
        return not bool(handle.get(key).any())
    except LytoolsError:
        return False


def _zero_fillers(handle, shapes: Mapping[str, tuple[int, ...]], net: NetworkArch) -> set[str]:
    """Return the zero rank-1 modules that complete OpenCLIP attention layers for AUTOMATIC1111
    (lytools.arch.a1111; lytools' kohya outputs hold them): they change nothing and were not trained."""
    from lytools.arch.a1111 import OPEN_CLIP_PREFIX, fillers, may_be_filler

    arches = [arch for arch in dict.fromkeys((net.arch, *net.tied)) if arch in OPEN_CLIP_PREFIX]
    zero = {
        module for module, suffixes in net.modules.items()
        if any(may_be_filler(arch, module, {s: tuple(shapes[k]) for s, k in suffixes.items()}) for arch in arches)
        and all(_all_zero(handle, suffixes[s]) for s in ("lora_down.weight", "lora_up.weight"))
    }
    return fillers(net.modules, zero) if zero else set()


def _network_report(handle, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str], net: NetworkArch,
                    verbose: bool, configs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    from lytools.algos import KNOWN_SUFFIXES, describe_shapes

    algorithms: Counter[str] = Counter()
    ranks: list[float] = []
    alphas: list[float] = []
    scales: list[float] = []
    missing_alpha = 0
    zero_alpha = 0  # kohya and LyCORIS read alpha 0 as alpha = rank (scale 1; ALGORITHMS.md 1.3)
    dora: Counter[str] = Counter()
    conv = Counter()
    invalid: list[str] = []
    ignored: Counter[str] = Counter()
    blocks: dict[str, dict[str, Any]] = {}
    oft: dict[str, list[float]] = {"block_size": [], "blocks": [], "butterfly_stages": [], "constraint": []}
    zero_fillers = _zero_fillers(handle, shapes, net)
    for module, suffixes in sorted(net.modules.items()):
        known = {s: shape for s, shape in module_shapes(suffixes, shapes).items() if s in KNOWN_SUFFIXES}
        ignored.update(s for s in suffixes if s not in KNOWN_SUFFIXES)
        scalars: dict[str, float] = {}
        for scalar in ("alpha", "on_input"):
            if scalar in suffixes:
                value = _read_scalar(handle, suffixes[scalar])
                if value is not None:
                    scalars[scalar] = value
        try:
            info = describe_shapes(module, known, scalars)
        except LytoolsError as exc:
            invalid.append(str(exc))
            continue
        algorithms[info.algo] += 1
        if module in zero_fillers:
            continue  # counted apart: in rank, alpha, scale and blocks they would pass for trained rank-1 modules
        if info.rank is not None:
            ranks.append(info.rank)
        scale = info.scale
        configured = None
        if configs and info.rank is not None and "alpha" not in suffixes:
            configured = _config_scale(configs, module, info.rank)  # diffusers/peft: lora_alpha / r of its config
        if configured is not None:
            scale = configured
            scalars["alpha"] = configured * info.rank
            alphas.append(scalars["alpha"])
        elif "alpha" in scalars and info.algo not in ("oft", "boft"):
            alphas.append(scalars["alpha"])
            zero_alpha += scalars["alpha"] == 0 and info.rank is not None
        elif info.rank is not None and "alpha" not in suffixes:
            missing_alpha += 1
        if scale is not None:
            scales.append(scale)
        if info.dora:
            dora[info.dora] += 1
        if info.blocks is not None:  # OFT (n blocks, size b) / BOFT (M stages, n, b): the "dim" is b
            oft["block_size"].append(info.blocks[-1])
            oft["blocks"].append(info.blocks[-2])
            if info.algo == "boft":
                oft["butterfly_stages"].append(info.blocks[0])
            if info.constraint:  # alpha of an OFT module: 0 = unconstrained
                oft["constraint"].append(info.constraint)
        # LoHa/LoKr store a conv flattened: its kernel is then the target module's
        kind = _target_kind(net.arch, module) if info.kernel is None else None
        if info.is_conv or kind == "conv3x3":
            conv["tucker" if info.tucker else "kxk"] += 1
        elif info.kernel == (1, 1) or kind == "conv1x1":
            conv["1x1"] += 1
        if verbose:
            label = block_of(module)
            entry = blocks.setdefault(label, {"modules": 0, "ranks": [], "alphas": [], "algorithms": Counter()})
            entry["modules"] += 1
            entry["algorithms"][info.algo] += 1
            if info.rank is not None:
                entry["ranks"].append(info.rank)
            if "alpha" in scalars:
                entry["alphas"].append(scalars["alpha"])
    report: dict[str, Any] = {
        "modules": len(net.modules),
        "algorithms": dict(sorted(algorithms.items())),
        "components": dict(sorted((net.components or _components_by_name(net.modules)).items())),
        "layouts": dict(sorted(net.layouts.items())),
        "matched_modules": net.matched,
        "dora": bool(dora),
        "dora_axes": dict(dora),
        "rank": _summary(ranks),
        "alpha": _summary(alphas),
        "scale": _summary(scales),
        "modules_without_alpha": missing_alpha,
        "modules_with_zero_alpha": zero_alpha,
        # zero rank-1 modules completing OpenCLIP attention layers for A1111: in modules and algorithms,
        # not in rank, alpha, scale or blocks
        "zero_filler_modules": len(zero_fillers),
        "oft": {key: {k: _number(v) for k, v in summary.items()} if (summary := _summary(values)) else None
                for key, values in oft.items()} if oft["block_size"] else None,
        "conv_modules": {"kxk": conv["kxk"], "tucker": conv["tucker"], "1x1": conv["1x1"]},
        "stray_keys": sorted(net.stray)[:50],
        "stray_key_count": len(net.stray),
        "invalid_modules": invalid[:20],
        "invalid_module_count": len(invalid),
        "ignored_suffixes": dict(ignored),
        "scalars_read": sum(1 for s in net.modules.values() for k in ("alpha", "on_input") if k in s),
    }
    for key in ("rank", "alpha", "scale"):
        if report[key]:
            report[key] = {k: _number(v) for k, v in report[key].items()}
    if verbose:
        report["blocks"] = {
            label: {
                "modules": entry["modules"],
                "algorithms": dict(entry["algorithms"]),
                "rank": {k: _number(v) for k, v in (_summary(entry["ranks"]) or {}).items()} or None,
                "alpha": {k: _number(v) for k, v in (_summary(entry["alphas"]) or {}).items()} or None,
            }
            for label, entry in sorted(blocks.items(), key=lambda item: _natural(item[0]))
        }
    return report


def _hash_report(path: Path, handle, metadata: Mapping[str, str], entries: list) -> dict[str, Any]:
    if isinstance(handle, (ShardedFile, DiffusersFolder)):  # hashing the index file would name the wrong bytes
        return {"note": "stored in several files: no single-file hash (info --hash each weights file)"}
    if not isinstance(handle, SafetensorsFile):
        # a pickle has no data section (no AutoV3), but A1111's old model hash (AutoV1, the one older
        # infotexts name .ckpt models by) is the same 64 KiB window at 1 MiB as for any file (FORMATS.md 5.4)
        digest, window = hashlib.sha256(), LegacyWindow()
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(8 << 20), b""):
                digest.update(chunk)
                window.feed(chunk)
        return {"sha256": digest.hexdigest(), "autov2": digest.hexdigest()[:10], "autov1": window.hexdigest(),
                "note": "not a safetensors file: no AutoV3"}
    hashes = file_hashes(path)
    report: dict[str, Any] = hashes.as_dict()
    checks: dict[str, Any] = {}
    embedded = metadata.get("sshs_model_hash")
    if embedded is not None:
        checks["sshs_model_hash"] = _check_model_hash(embedded.strip().lower(), hashes.data_sha256)
    legacy = metadata.get("sshs_legacy_hash")
    if legacy is not None:
        expected = _sd_scripts_legacy(handle, metadata, entries)
        checks["sshs_legacy_hash"] = {"embedded": legacy, "computed": expected, "matches": legacy.strip().lower() == expected}
    spec = metadata.get("modelspec.hash_sha256")
    if spec is not None:
        checks["modelspec.hash_sha256"] = _check_model_hash(spec.strip().lower(), hashes.data_sha256, state_dict_order=True)
    if checks:
        report["embedded"] = checks
    return report


def _check_model_hash(value: str, data_sha256: str, state_dict_order: bool = False) -> dict[str, Any]:
    """Compare an embedded hash with the data section's SHA-256, naming the convention it follows."""
    if value.startswith("0x"):
        digits = value[2:]
        result = {"embedded": value, "convention": "state-dict order (LyCORIS / modelspec)"}
        if digits == EMPTY_SHA256:
            return result | {"matches": False, "note": "SHA-256 of empty input (a known ai-toolkit bug)"}
        if digits == data_sha256:
            return result | {"matches": True}
        # the writer's state-dict order is unknown; a mismatch may only mean another order
        return result | {"matches": None, "note": "differs from the file-order hash; the writer's tensor order is unknown"}
    if state_dict_order:
        return {"embedded": value, "convention": "unknown", "matches": value == data_sha256 or None}
    result = {"embedded": value, "convention": "addnet / sd-scripts (data section)"}
    if value == EMPTY_SHA256:
        return result | {"matches": False, "note": "SHA-256 of empty input (a known ai-toolkit bug)"}
    return result | {"matches": value == data_sha256}


def _sd_scripts_legacy(handle: SafetensorsFile, metadata: Mapping[str, str], entries: list) -> str:
    """Return sd-scripts' legacy hash: the 64 KiB at 1 MiB of the file it would write (ss_* metadata only)."""
    header = build_header(file_order(entries), ss_only(metadata))
    window = bytearray()
    if len(header) > LEGACY_OFFSET:
        window += header[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]
    need = LEGACY_LENGTH - len(window)
    start = max(0, LEGACY_OFFSET - len(header))
    data_len = handle.header.data_bytes
    if need > 0 and start < data_len:
        with open(handle.path, "rb") as stream:
            stream.seek(handle.header.data_start + start)
            window += stream.read(min(need, data_len - start))
    return hashlib.sha256(bytes(window)).hexdigest()[:8]


def inspect_file(path: str | Path, *, hashes: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Return what a file is, as a JSON-ready dict (see the module docstring for what is read)."""
    path = Path(path)
    with open_file(path, keep_ema=True) as handle:  # info shows what the file holds
        infos = {info.name: info for info in handle.infos()}
        metadata = dict(handle.metadata or {})
        shapes = {name: tuple(info.shape) for name, info in infos.items()}
        dtypes = {name: info.dtype for name, info in infos.items()}
        # a sharded index or a folder: the bytes of every file read, not of the index or the directory entry
        size = getattr(handle, "file_bytes", None)
        report: dict[str, Any] = {"path": str(path), "file_bytes": size if size is not None else path.stat().st_size}
        if isinstance(handle, SafetensorsFile):
            report["format"] = "safetensors"
            report["header_bytes"] = handle.header.header_len
            extra = handle.header.extra_fields
            if extra:
                report["extra_header_fields"] = {name: fields for name, fields in sorted(extra.items())[:50]}
                report["extra_header_field_count"] = len(extra)
        elif isinstance(handle, ShardedFile):
            report["format"] = f"safetensors (sharded index, {len(handle.shard_paths)} shards)"
        elif isinstance(handle, DiffusersFolder):
            report["format"] = "diffusers folder (" + ", ".join(
                f"{name}/{weights.name}" for name, weights in handle.weights.items()) + ")"
        elif isinstance(handle, PickledFile):
            report["format"] = "pickle (weights-only load, not header-only)"
        report["tensor_count"] = len(infos)
        report["tensor_bytes"] = sum(info.nbytes for info in infos.values())
        report["dtypes"] = dict(sorted(Counter(dtypes.values()).items()))
        net = detect_network(shapes, metadata)
        network_keys = sum(len(v) for v in net.modules.values())
        notes: list[str] = []
        if net.modules and network_keys * 2 >= len(infos):
            report["kind"] = "network"
            report["architecture"] = net.arch
            report["architecture_candidates"] = list(net.tied)  # when unknown because the modules fit several
            report["layout"] = net.layout
            configs: dict[str, Any] = {}
            if net.layout in ("diffusers", "peft"):
                configs, config_notes = _adapter_configs(path, metadata, net.layout)
                notes.extend(config_notes)
            report["network"] = _network_report(handle, shapes, dtypes, net, verbose, configs)
            if net.scale != 1:
                notes.append(f"shapes fit {net.arch} scaled down {net.scale}x (a synthetic test model)")
            if net.layout in ("kohya", "lycoris"):
                from lytools.arch.a1111 import missing_attention_parts

                gaps = missing_attention_parts(net.arch, net.modules)
                if gaps:
                    notes.append(f"AUTOMATIC1111 skips the OpenCLIP attention layers that hold only some of q/k/v/out "
                                 f"({len(gaps)} modules missing, e.g. {next(iter(gaps))}); lytools convert --to kohya "
                                 "completes them with zero modules")
            notes.extend(net.notes)
            if net.tied:  # info has no --arch; of the commands that read networks, convert takes one
                notes.append(f"lytools convert takes --arch ({' or '.join(net.tied)}) to read it as one of them")
        else:
            found = detect_checkpoint(shapes, detection_metadata(handle))
            report["kind"] = "checkpoint" if (found.arch != "unknown" or found.components) else "unknown"
            if report["kind"] == "unknown" and infos:
                report["kind"] = "checkpoint"  # plain weights of an architecture lytools does not know
            if not infos:
                report["kind"] = "unknown"
            report["architecture"] = found.arch
            report["layout"] = found.layout
            report["checkpoint"] = {
                "variant": found.variant,
                "prefix": found.prefix,
                "components": found.components,
                "text_encoder_only": found.text_encoder_only,
                "in_channels": found.in_channels,
                "context_dim": found.context_dim,
                "prediction": found.prediction,
                "blocks": found.blocks,
            }
            if found.scale != 1:
                notes.append(f"shapes are {found.arch} scaled down {found.scale}x (a synthetic test model)")
            notes.extend(found.notes)
        if isinstance(handle, PickledFile):
            if handle.legacy:
                notes.append("a legacy (torch < 1.6, non-zip) pickle: read whole into memory, not mapped")
            if handle.ema_count and handle.ema_count < len(infos):
                notes.append(f"holds an EMA copy ({handle.ema_count} model_ema.* tensors), which merge and convert "
                             f"leave out unless --keep-ema")
        shard = lone_shard(path)
        if shard:  # the rest of the model is in the other shards
            notes.append(shard.split(": ", 1)[1])
        report["metadata"] = _metadata_summary(metadata)
        if hashes:
            entries = [plan_entry(name, info.dtype, info.shape) for name, info in infos.items()]
            report["hashes"] = _hash_report(path, handle, metadata, entries)
        report["notes"] = notes
    return report


def verify_problems(report: Mapping[str, Any]) -> list[str]:
    """Return one message per embedded hash that does not match (for `info --verify`)."""
    problems = []
    for name, check in (report.get("hashes", {}).get("embedded") or {}).items():
        if check.get("matches") is False:
            problems.append(f"{report['path']}: embedded {name} {check['embedded']} does not match the file"
                            + (f" ({check['note']})" if check.get("note") else ""))
    return problems


# -- human-readable output ----------------------------------------------------------------------------
def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{size} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{size} B"


def _range(summary: Mapping[str, Any] | None) -> str:
    if not summary:
        return "-"
    low, mid, high = summary["min"], summary["median"], summary["max"]
    return f"{low}" if low == high else f"min {low}, median {mid}, max {high}"


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items()) or "-"


def format_report(report: Mapping[str, Any], verbose: bool = False) -> str:
    """Return the report as aligned `label  value` lines under the file name."""
    lines = [report["path"]]

    def row(label: str, value: object) -> None:
        lines.append(f"  {label:<14}{value}")

    kind = report["kind"]
    layout = report.get("layout")
    row("kind", f"{kind} ({layout} layout)" if layout not in (None, "unknown") else kind)
    arch = report["architecture"]
    checkpoint = report.get("checkpoint")
    if checkpoint and checkpoint.get("variant"):
        arch += f" ({checkpoint['variant']})"
    if report.get("architecture_candidates"):
        arch += f" ({' or '.join(report['architecture_candidates'])}: the modules fit each)"
    row("architecture", arch)
    if checkpoint:
        components = ", ".join(f"{k} [{v or 'no prefix'}]" for k, v in checkpoint["components"].items()) or "-"
        row("components", components + (" (text encoders only, no denoiser)" if checkpoint["text_encoder_only"] else ""))
        if checkpoint.get("in_channels") is not None:
            row("in channels", checkpoint["in_channels"])
        if checkpoint.get("blocks"):
            row("blocks", _counts(checkpoint["blocks"]))
        row("prediction", checkpoint["prediction"])
    network = report.get("network")
    if network:
        row("modules", f"{network['modules']}: {_counts(network['algorithms'])}")
        row("components", _counts(network["components"]))
        rank = _range(network["rank"])
        if network.get("zero_filler_modules"):
            rank += (f" (and {network['zero_filler_modules']} zero rank-1 filler modules: A1111 completion of "
                     "OpenCLIP attention layers, not counted here)")
        row("rank", rank)
        alpha = _range(network["alpha"])
        if network["modules_without_alpha"]:
            alpha += f" ({network['modules_without_alpha']} modules without alpha: alpha = rank)"
        if network.get("modules_with_zero_alpha"):
            alpha += (f" ({network['modules_with_zero_alpha']} modules with alpha 0: kohya and LyCORIS read it as "
                      "alpha = rank; a loader that applies alpha / rank as stored gets 0)")
        row("alpha", alpha)
        if network["scale"]:
            row("scale", f"{_range(network['scale'])} (alpha / rank)")
        oft = network.get("oft")
        if oft:
            text = f"size {_range(oft['block_size'])}, {_range(oft['blocks'])} blocks"
            if oft["butterfly_stages"]:
                text += f", {_range(oft['butterfly_stages'])} butterfly stages"
            text += f"; constraint {_range(oft['constraint'])}" if oft["constraint"] else "; unconstrained"
            row("oft blocks", text)
        conv = network["conv_modules"]
        row("conv modules", f"{conv['kxk']} kxk, {conv['tucker']} tucker, {conv['1x1']} 1x1")
        row("dora", ("yes: " + _counts(network["dora_axes"]) + " axis") if network["dora"] else "no")
        if network["stray_key_count"]:
            row("stray keys", f"{network['stray_key_count']} ({', '.join(network['stray_keys'][:3])}…)")
        if network["invalid_module_count"]:
            row("invalid", f"{network['invalid_module_count']} modules: {network['invalid_modules'][0]}")
        if verbose and network.get("blocks"):
            lines.append("  per block:")
            for label, block in network["blocks"].items():
                lines.append(f"    {label:<28}{block['modules']:>4} modules  rank {_range(block['rank'])}  alpha {_range(block['alpha'])}")
    row("tensors", f"{report['tensor_count']} ({_counts(report['dtypes'])}), {_human_bytes(report['tensor_bytes'])}"
        f" in a {_human_bytes(report['file_bytes'])} file")
    if report.get("extra_header_field_count"):
        row("header extras", f"{report['extra_header_field_count']} tensors carry extra header fields")
    metadata = report["metadata"]
    if metadata["count"]:
        shown = {**metadata["ss"], **metadata["modelspec"]}
        row("metadata", f"{metadata['count']} keys")
        limit = None if verbose else 8
        for key, value in list(shown.items())[:limit]:
            lines.append(f"    {key} = {value if verbose else value[:80]}")
        others = metadata["ss_other_keys"] + list(metadata["other"])
        if others:
            lines.append(f"    other keys: {', '.join(others[:12])}{'…' if len(others) > 12 else ''}")
    else:
        row("metadata", "none")
    shared = metadata.get("revealing")
    if shared:
        what = dict.fromkeys(REVEALING_KEYS[key] for key in shared)
        row("shares", f"{', '.join(what)} ({', '.join(shared)}): --strip-metadata drops them")
    hashes = report.get("hashes")
    if hashes:
        if "sshs_model_hash" in hashes:
            row("sha256", hashes["sha256"])
            row("AutoV2", hashes["autov2"])
            row("AutoV3", f"{hashes['autov3']} (sshs_model_hash {hashes['sshs_model_hash']})")
            row("legacy", hashes["sshs_legacy_hash"])
        elif "sha256" in hashes:
            row("sha256", f"{hashes['sha256']} ({hashes['note']})")
            row("AutoV2", hashes["autov2"])
            row("AutoV1", f"{hashes['autov1']} (A1111's old model hash)")
        else:
            row("hashes", hashes["note"])
        for name, check in (hashes.get("embedded") or {}).items():
            verdict = {True: "matches", False: "DOES NOT MATCH", None: "unverified"}[check.get("matches")]
            extra = f"; {check['note']}" if check.get("note") else ""
            if name == "sshs_legacy_hash" and check.get("computed") != hashes.get("sshs_legacy_hash"):
                # sd-scripts hashes the 64 KiB at 1 MiB of the file as it writes it with ss_* metadata only
                extra += (f" ({check['computed']}: the window of this file saved with its ss_* metadata only, "
                          f"as sd-scripts computes it; the file's own is the legacy above)")
            row("embedded", f"{name} {verdict}{extra}")
    for note in report.get("notes", []):
        row("note", note)
    return "\n".join(lines)


def inspect_files(paths: Iterable[str | Path], *, hashes: bool = False, verbose: bool = False):
    """Yield (path, report or None, error message or None) for each path, never stopping at a bad file."""
    for path in paths:
        try:
            yield path, inspect_file(path, hashes=hashes, verbose=verbose), None
        except LytoolsError as exc:
            print_debug_traceback(exc)  # the traceback the README promises
            yield path, None, str(exc)
