"""`convert --verify`: reload a written output the way its target loader reads it and compare every
module's weight change with the input's.

The input is read by lytools (load_network: every layout, the scale from alphas or configs, split
q/k/v fused into the kohya module). The output is read here on its own, with the target loader's
rules and nothing of the writer's:

kohya      ΔW = alpha/rank · up·down (no alpha: scale 1), other LyCORIS algorithms through
           lytools.algos; `dora_scale` and stray keys as stored.
diffusers  `<component>.<path>.lora_A/lora_B`, scale lora_alpha / r of the component's entry in
           `lora_adapter_metadata` (with rank_pattern / alpha_pattern; none: scale 1, as diffusers
           reads a file without network alphas); `lora_B.bias` times the scale; magnitudes need
           use_dora, and the stored rank must be the config's (else the loader fails or re-inits).
peft       the same from adapter_config.json beside the adapter; modules must match target_modules.

Output modules are placed on the input's modules through the architecture's tables (a diffusers
`to_q` is rows 0..n of the fused Flux `qkv`; halves of a swapped modulation exchanged back), so a
fused kohya module and its split parts compare row for row. Each module's change is compared in
float64 through 64 fixed random probe vectors (ΔW·P: the factors are never multiplied out, a
sketch of the relative Frobenius error; modules with at most 64 input features are compared
whole). Allowed: 1e-9 where the output should be exact (same dtype, no fold); one unit of the
dtype for a fold by a power of two (exact but for subnormals); else the rounding of the output
dtype (lytools.resize.verify.ROUNDING, shared with `resize --verify`). Non-additive modules (IA³, OFT, DoRA magnitudes) compare tensor by tensor
against the input cast to the written dtype, as a plain `--save-dtype` cast does for every tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from lytools.algos import NetworkModule, bias_delta, delta, describe_module
from lytools.algos.common import flat2, module_scale
from lytools.arch import ENCODERS
from lytools.convert import names
from lytools.convert.fuse import ALPHA, BIAS, DORA, DOWN, MID, UP, halves_swap_applies, scale_of
from lytools.convert.load import Network, _pattern_entry, adapter_metadata, config_scale, load_network
from lytools.errors import LytoolsError
from lytools.io import open_file
from lytools.io.dtypes import is_float, saturating_cast
from lytools.resize.verify import ROUNDING

EXACT = 1e-9  # relative error allowed where the written change should equal the input's (float64 products)
PROBES = 64
_LORA_BIAS = "lora_up.bias"  # lora_B.bias in LyCORIS spelling (lytools.arch.split_network_key)
_PEFT_PREFIX = "base_model.model."


@dataclass
class VerifyResult:
    """Per module: (relative error, allowed) for the checked ones, a reason for the others that failed."""

    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # module or key -> what is wrong
    unit: str = "modules"  # what was compared: modules (networks), tensors (casts)
    written_as: dict[str, list[str]] = field(default_factory=dict)  # input module -> output names, where they differ
    flattened: int = 0  # DoRA modules --flatten-dora replaced by plain LoRA (compared with the flattening redone)

    @property
    def failed(self) -> list[str]:
        off = [name for name, (error, allowed) in self.errors.items() if not error <= allowed]
        return list(self.problems) + off

    @property
    def ok(self) -> bool:
        return not self.failed

    def message(self, output: Path) -> str:
        failed = self.failed
        total = len(set(self.errors) | set(self.problems))
        if self.problems:
            name = next(iter(self.problems))
            worst = f"{self._named(name)}: {self.problems[name]}"
        else:
            name = max(failed, key=lambda n: self.errors[n][0] / max(self.errors[n][1], 1e-300))
            error, allowed = self.errors[name]
            worst = f"worst {self._named(name)}: relative error {error:.3g} > allowed {allowed:.3g}"
        return f"{output}: --verify failed: {len(failed)} of {total} {self.unit} off, {worst}; output removed"

    def _named(self, name: str) -> str:
        written = self.written_as.get(name)
        return f"{name} (written as {', '.join(written)})" if written else name

    def as_dict(self) -> dict:
        """The figures of a passed check, for --json: what was compared and the largest relative error."""
        figures = {"compared": len(self.errors), "unit": self.unit,
                   "largest_relative_error": max((error for error, _ in self.errors.values()), default=0.0)}
        if self.flattened:
            figures["flattened"] = self.flattened
        return figures

    def summary(self) -> str:
        largest = max((error for error, _ in self.errors.values()), default=0.0)
        exact = largest == 0.0
        if self.unit != "modules":
            return f"verified: {len(self.errors)} {self.unit}, each the input's cast to the written dtype"
        flattened = (f"{self.flattened} of them flattened DoRA, compared with the flattening done again on --base "
                     f"(its error against W' - W is --flatten-dora's report)") if self.flattened else ""
        count = len(self.errors)
        return (f"verified: {count} module{'' if count == 1 else 's'} as the target loader reads them, largest relative "
                f"error {largest:.3g}" + (" (exact)" if exact else "") + (f"; {flattened}" if flattened else ""))


# -- one module's change ---------------------------------------------------------------------------------
_PROBE_CACHE: dict[int, torch.Tensor] = {}


def _probes(columns: int) -> torch.Tensor:
    """Return the fixed probe matrix for ΔW with `columns` input features (identity when small)."""
    found = _PROBE_CACHE.get(columns)
    if found is None:
        if columns <= PROBES:
            found = torch.eye(columns, dtype=torch.float64)
        else:
            generator = torch.Generator().manual_seed(columns)
            found = torch.randn(columns, PROBES, generator=generator, dtype=torch.float64)
        if len(_PROBE_CACHE) > 32:
            _PROBE_CACHE.clear()
        _PROBE_CACHE[columns] = found
    return found


@dataclass
class Change:
    """A module's weight change as a loader applies it: ΔW·P (rows × probes, float64), ΔB, the DoRA
    magnitude (flat, as stored), or the tensors themselves for a non-additive module."""

    sketch: torch.Tensor | None
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    tensors: Mapping[str, torch.Tensor] | None = None  # non-additive: compared tensor by tensor
    dtype: torch.dtype | None = None  # the factors' dtype


def _plain_lora(tensors: Mapping[str, torch.Tensor]) -> bool:
    return DOWN in tensors and UP in tensors and MID not in tensors and set(tensors) <= {DOWN, UP, ALPHA, DORA, BIAS, _LORA_BIAS}


def module_change(name: str, tensors: Mapping[str, torch.Tensor], scale: float | None = None) -> Change:
    """Return a module's change; scale None: kohya's rule (alpha / rank, no alpha: 1), else the given
    (diffusers/peft) scale, which also multiplies a `lora_B.bias`."""
    tensors = dict(tensors)
    magnitude = tensors.pop(DORA, None)
    magnitude = magnitude.reshape(-1) if magnitude is not None else None
    first = tensors.get(DOWN, next((t for s, t in tensors.items() if s != ALPHA), None))
    dtype = first.dtype if first is not None else None
    if _plain_lora(tensors):
        down, up = tensors[DOWN], tensors[UP]
        rank = int(down.shape[0])
        s = module_scale(NetworkModule(name, tensors), rank) if scale is None else scale
        flat_down = flat2(down).to(torch.float64)
        sketch = flat2(up).to(torch.float64) @ (flat_down @ _probes(flat_down.shape[1])) * s
        bias = tensors.get(BIAS)
        if _LORA_BIAS in tensors:
            bias = tensors[_LORA_BIAS].to(torch.float64) * s
        return Change(sketch, None if bias is None else bias.to(torch.float64).reshape(-1), magnitude, dtype=dtype)
    module = NetworkModule(name, tensors)
    info = describe_module(module)
    if not info.additive or info.needs_weight or not info.delta_shape:
        return Change(None, None, magnitude, tensors=tensors, dtype=dtype)
    dense = flat2(delta(module, info.delta_shape)).to(torch.float64)
    change = bias_delta(module)
    return Change(dense @ _probes(dense.shape[1]), None if change is None else change.to(torch.float64).reshape(-1),
                  magnitude, dtype=dtype)


def _same_after_cast(source: torch.Tensor, written: torch.Tensor) -> bool:
    """True when `written` is `source` cast to the written dtype (floats saturating; NaN equals NaN)."""
    if source.shape != written.shape and source.numel() != written.numel():
        return False
    source = source.reshape(written.shape)
    if is_float(source.dtype) and is_float(written.dtype):
        expected = saturating_cast(source, written.dtype)[0] if source.dtype != written.dtype else source
        if expected.dtype.itemsize == 1:  # fp8: compare the bits
            return torch.equal(expected.view(torch.uint8), written.view(torch.uint8))
        return bool(((expected == written) | (torch.isnan(expected) & torch.isnan(written))).all())
    return source.dtype == written.dtype and torch.equal(source, written)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    norm = float(torch.linalg.vector_norm(want))
    error = float(torch.linalg.vector_norm(got - want))
    return error / norm if norm > 0 else error


# -- reading the output as its loader does -----------------------------------------------------------------
@dataclass
class _Written:
    """One output module: where it lands on the input's modules and its change."""

    stored: str
    canonical: str | None
    rows: tuple[int, int] | None
    swap: bool
    tensors: dict[str, torch.Tensor]
    scale: float | None = None  # diffusers/peft: from the config (None: kohya rule)


def _group(keys) -> tuple[dict[str, dict[str, str]], list[str]]:
    from lytools.arch import split_network_key

    modules: dict[str, dict[str, str]] = {}
    stray: list[str] = []
    for key in keys:
        split = split_network_key(key)
        if split is None:
            stray.append(key)
        else:
            modules.setdefault(split[0], {})[split[1]] = key
    return modules, stray


def _target_match(path: str, targets: Any) -> bool:
    import re

    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in (targets or ()))


def _config_problems(config: Mapping[str, Any], config_path: str, tensors: Mapping[str, torch.Tensor], peft: bool) -> str | None:
    """What a peft/diffusers loader would do otherwise than read the module as stored, or None
    (config_path: the module's path as peft configs name it, without `text_model.`)."""
    if peft and not _target_match(config_path, config.get("target_modules")):
        return "not in the config's target_modules (peft would not load it)"
    _, pattern_rank = _pattern_entry(config.get("rank_pattern"), config_path)
    rank = int(pattern_rank if pattern_rank is not None else config.get("r", 8))
    if DOWN in tensors and int(tensors[DOWN].shape[0]) != rank:
        return f"rank {int(tensors[DOWN].shape[0])} stored, {rank} in the config"
    if (DORA in tensors) != bool(config.get("use_dora", False)):
        return "DoRA magnitude without use_dora" if DORA in tensors else "use_dora set but no magnitude stored"
    return None


def _read_output(output: Path, target: str, net: Network, expected: Mapping[str, NetworkModule],
                 config_file: Path | None) -> tuple[list[_Written], dict[str, str], dict[str, torch.Tensor]]:
    """Return (modules, problems, stray tensors) of a written output, read as its loader reads it
    (`expected`: the input's modules it should hold, which settle the model of a bare peft path)."""
    problems: dict[str, str] = {}
    written: list[_Written] = []
    with open_file(output) as reader:
        groups, stray_keys = _group(reader.keys())
        stray = {key: reader.get(key).clone() for key in stray_keys}
        configs: dict[str, dict[str, Any]] = {}
        if target == "diffusers":
            configs = adapter_metadata(reader.metadata or {}, output)
        elif target == "peft":
            if config_file is None or not config_file.is_file():
                raise LytoolsError(f"{output}: --verify: adapter_config.json missing")
            configs = {"": json.loads(config_file.read_text())}
        for stored, keys in list(groups.items()):
            if set(keys) == {ALPHA} and keys[ALPHA] in net.stray:  # a lone alpha the input had: a stray key
                stray[keys[ALPHA]] = reader.get(keys[ALPHA]).clone()
                continue
            tensors = {suffix: reader.get(key).clone() for suffix, key in keys.items()}
            if target == "kohya":
                written.append(_Written(stored, stored, None, False, tensors))
                continue
            if target == "peft":
                component, path = "", stored[len(_PEFT_PREFIX):] if stored.startswith(_PEFT_PREFIX) else stored
            else:
                component, _, path = stored.partition(".")
            config = configs.get(component)
            config_path = path[len("text_model."):] if path.startswith("text_model.") else path
            scale = 1.0
            if DOWN not in tensors or UP not in tensors:
                problems[stored] = "not a LoRA module (lora_A and lora_B)"
                continue
            if config is not None:
                problem = _config_problems(config, config_path, tensors, target == "peft")
                if problem:
                    problems[stored] = problem
                    continue
                scale = config_scale(config, config_path, int(tensors[DOWN].shape[0]))
            elif target == "peft" or DORA in tensors:
                problems[stored] = "no config entry for its component"
                continue
            hits = [c for c in names.candidates(net.arch, stored) if c.module in expected]
            if not hits:
                problems[stored] = "matches no module of the input"
                continue
            hit = hits[0]
            written.append(_Written(stored, hit.module, names.scale_rows(hit.module_rows, net.scale), hit.swap_halves,
                                    tensors, scale))
    return written, problems, stray


def _swap(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    half = tensor.shape[0] // 2
    return torch.cat([tensor[half:], tensor[:half]])


def _kept_modules(net: Network, target: str, component: str | None) -> dict[str, NetworkModule]:
    """The input's modules the output should hold (a peft adapter holds one model's)."""
    if target != "peft" or component is None:
        return dict(net.modules)
    encoders = {e.component: e.diffusers for e in ENCODERS.get(net.arch, ())}
    wanted = encoders.get(component) or encoders.get({"te": "te1", "te1": "te"}.get(component, ""))
    return {name: module for name, module in net.modules.items()
            if encoders.get(names.component_of(net.arch, name) or "") == wanted}


def _folds(target: str, fold: bool | None) -> bool:
    return bool(fold) if target == "kohya" else fold is not False


def _allowed(source: Change, written_dtype: torch.dtype | None, folded: bool, scale: float) -> float:
    """EXACT for factors written as they were; one unit of the dtype for a fold by a power of two (exact
    but for subnormals, which lose their last bits); else the dtype's rounding (as resize --verify allows)."""
    if written_dtype == source.dtype and (not folded or scale == 1.0):
        return EXACT
    if written_dtype == source.dtype and scale > 0 and math.isfinite(scale) and math.frexp(scale)[0] == 0.5:
        return max(EXACT, torch.finfo(written_dtype).eps) if written_dtype is not None and written_dtype.is_floating_point else EXACT
    return ROUNDING.get(written_dtype, 2e-2)


def verify_network(source: Path, output: Path, target: str, *, arch: str | None = None, fold: bool | None = None,
                   component: str | None = None, config_file: Path | None = None, base: Path | None = None,
                   save_dtype: torch.dtype | None = None) -> VerifyResult:
    """Compare every module of the network written at `output` (layout `target`) with `source`'s.
    base (--flatten-dora --base): the input's DoRA modules were replaced by plain LoRA approximating their
    change on that model; the flattening is done again here from the input and the base, and the
    written modules are compared with it (to the dtype's rounding: the SVD is worked out anew)."""
    net = load_network(source, arch=arch, hash_data=False)  # no AutoV3 needed here
    dora = {name for name, module in net.modules.items() if DORA in module.tensors}
    if base is not None and dora:
        from lytools.convert.dora import flatten_dora, open_base
        from lytools.convert.run import FileResult

        net = flatten_dora(net, open_base(base), FileResult(source), save_dtype)  # the figures are convert's to say
    else:
        dora = set()
    expected = _kept_modules(net, target, component)
    written, problems, stray = _read_output(output, target, net, expected, config_file)
    result = VerifyResult(problems=problems)
    folded = _folds(target, fold)
    by_module: dict[str, list[_Written]] = {}
    for item in written:
        if item.canonical not in expected:
            if target == "kohya":  # A1111 completion adds zero modules the input lacks: they must change nothing
                change = module_change(item.stored, item.tensors)
                if change.sketch is None or bool(change.sketch.any()) or (change.bias is not None and bool(change.bias.any())):
                    result.problems[item.stored] = "not in the input and not zero"
            else:
                result.problems[item.stored] = "matches no module the output should hold"
            continue
        by_module.setdefault(item.canonical, []).append(item)
    for name, module in expected.items():
        pieces = by_module.get(name)
        if not pieces:
            result.problems[name] = "missing from the output"
            continue
        if name in dora:
            result.flattened += 1
            if any(DORA in item.tensors or not _plain_lora(item.tensors) for item in pieces):
                result.problems[name] = "--flatten-dora: not written as a plain LoRA"
                continue
        problem = _compare(name, module, pieces, folded, result, recomputed=name in dora)
        if problem:
            result.problems[name] = problem
    if target == "kohya":
        for key, tensor in net.stray.items():
            if key not in stray or not _same_after_cast(tensor, stray[key]):
                result.problems[key] = "stray key missing or changed"
    elif stray:
        result.problems[next(iter(stray))] = f"{len(stray)} keys that belong to no module"
    return result


def _compare(name: str, module: NetworkModule, pieces: list[_Written], folded: bool, result: VerifyResult,
             recomputed: bool = False) -> str | None:
    """Record the module's relative error (or return what is structurally wrong). recomputed: `module` was
    worked out again here (a flattened DoRA), so equal only to the written dtype's rounding."""
    if [item.stored for item in pieces] != [name]:
        result.written_as[name] = [item.stored for item in pieces]
    source = module_change(name, module.tensors)
    if source.tensors is not None:  # non-additive: the kohya output must hold the tensors, cast
        item = pieces[0]
        if len(pieces) > 1 or set(item.tensors) != set(module.tensors):
            return "tensors differ from the input's"
        if not all(_same_after_cast(module.tensors[s], item.tensors[s]) for s in module.tensors):
            return "tensors differ from the input cast to the written dtype"
        result.errors[name] = (0.0, EXACT)
        return None
    rows = source.sketch.shape[0]
    got = torch.zeros_like(source.sketch)
    got_bias = torch.zeros_like(source.bias) if source.bias is not None else None
    covered = torch.zeros(rows, dtype=torch.int32)
    magnitudes: list[tuple[tuple[int, int], torch.Tensor]] = []
    dtype = None
    for item in pieces:
        change = module_change(item.stored, item.tensors, item.scale)
        if change.sketch is None:
            return f"{item.stored} is not additive in the output"
        start, stop = item.rows if item.rows is not None else (0, rows)
        if change.sketch.shape != (stop - start, source.sketch.shape[1]):
            return f"{item.stored} has shape {tuple(change.sketch.shape)[:1]} rows for {stop - start}"
        swap = item.swap and halves_swap_applies(module.tensors)
        sketch, bias, magnitude = (_swap(change.sketch), _swap(change.bias), _swap(change.magnitude)) if swap else (
            change.sketch, change.bias, change.magnitude)
        got[start:stop] = sketch
        covered[start:stop] += 1
        if bias is not None:
            if got_bias is None:
                return f"{item.stored} adds a bias the input has not"
            got_bias[start:stop] = bias
        if magnitude is not None:
            magnitudes.append(((start, stop), magnitude))
        dtype = dtype or change.dtype
    if bool((covered > 1).any()):
        return "output rows written twice"
    missing = covered == 0  # left out only where the input changes nothing (a q/k/v part it was fused without)
    if bool(missing.any()) and (bool(source.sketch[missing].ne(0).any()) or source.magnitude is not None
                                or (source.bias is not None and bool(source.bias[missing].ne(0).any()))):
        return "output rows missing"
    if (source.magnitude is None) != (not magnitudes):
        return "DoRA magnitude missing" if source.magnitude is not None else "DoRA magnitude the input has not"
    for (start, stop), magnitude in magnitudes:
        if not _same_after_cast(source.magnitude[start:stop], magnitude):
            return "DoRA magnitude differs from the input's"
    scale = scale_of(name, module.tensors) if DOWN in module.tensors else 1.0
    allowed = _allowed(source, dtype, folded, scale)
    if recomputed:
        allowed = max(allowed, ROUNDING.get(dtype, 2e-2))
    error = _relative(got, source.sketch)
    if source.bias is not None:
        error = max(error, _relative(got_bias, source.bias))
    result.errors[name] = (error, allowed)
    return None


# -- dtype-only casts ------------------------------------------------------------------------------------
def verify_cast(source: Path, output: Path, *, keep_ema: bool = False) -> VerifyResult:
    """Check a cast (--save-dtype without --to): the same keys, each tensor the input's cast to the
    written dtype (floats saturating, integers unchanged), tensor by tensor."""
    result = VerifyResult(unit="tensors")
    with open_file(source, keep_ema=keep_ema) as before, open_file(output) as after:
        keys, written = set(before.keys()), set(after.keys())
        for key in sorted(keys ^ written):
            result.problems[key] = "missing from the output" if key in keys else "not in the input"
        for key in sorted(keys & written):
            old, new = before.get(key), after.get(key)
            if is_float(old.dtype) != is_float(new.dtype) or (not is_float(old.dtype) and old.dtype != new.dtype):
                result.problems[key] = f"dtype {new.dtype} for a {old.dtype} tensor"
            elif not _same_after_cast(old, new):
                result.problems[key] = "differs from the input cast to the written dtype"
            else:
                result.errors[key] = (0.0, EXACT)
    return result
