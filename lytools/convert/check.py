"""`convert --check`: would the target loader apply every module of a written network? (FORMATS.md 7, quirk 6)

ComfyUI and A1111 log and skip a LoRA key they cannot place ("lora key not loaded"), so a
mis-named output loads without error and changes nothing. This check resolves every module name
of an output against the name table of the loader its layout is for, for the file's architecture:

kohya      the kohya module table (lytools.arch.module_table: what sd-scripts trains and ComfyUI,
           A1111 and Forge map), plus `lora_unet_<path>` names of any other denoiser weight
           (LyCORIS full preset: conv_in, norms, time embedding), which ComfyUI maps for every
           weight of the model and A1111 finds in its module list. A text-encoder module outside
           the table (a layer norm) is not applied: ComfyUI maps only the encoders' linear layers.
diffusers  `<component>.<path>` in the diffusers module table (lytools.arch.diffusers_table), of a
           component the architecture's diffusers pipeline loads LoRA weights into (not T5:
           lytools.convert.layout.DIFFUSERS_LOADED).
peft       `base_model.model.<path>`: a path of one diffusers model (transformers 5 CLIP paths
           without `text_model.` too), every module of the adapter in the same model.

Keys that belong to no module (stray keys kohya outputs keep) are not modules and are not
checked. An architecture lytools cannot tell has no table to check against: that is an error
(say which with --arch), never a pass. Reads headers only; torch is not imported.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from lytools.arch import alias_table, detect_network, diffusers_table, module_table, split_network_key
from lytools.arch.keymap import NETWORK_ARCHS
from lytools.convert.layout import ALPHA, DIFFUSERS_LOADED
from lytools.errors import LytoolsError

LOADERS = {"kohya": "ComfyUI/A1111/Forge", "diffusers": "diffusers", "peft": "peft"}
_PEFT_PREFIX = "base_model.model."
SHOWN = 3  # unresolved modules named in the error


@dataclass
class CheckResult:
    """The modules of one output and those its loader would not apply (with why, in a few words)."""

    layout: str
    arch: str
    modules: int = 0
    unresolved: dict[str, str] = field(default_factory=dict)  # stored module name -> why

    @property
    def ok(self) -> bool:
        return not self.unresolved

    def message(self, output: Path) -> str:
        names = list(self.unresolved)
        more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
        reasons = {self.unresolved[name] for name in names}
        if len(reasons) == 1:  # one reason for all: said once
            shown = f"{reasons.pop()}: " + ", ".join(names[:SHOWN])
        else:
            shown = ", ".join(f"{name} ({self.unresolved[name]})" for name in names[:SHOWN])
        return (f"{output}: --check: {len(names)} of {self.modules} modules would not be applied by "
                f"{LOADERS[self.layout]} ({self.arch}): {shown}{more}")

    def summary(self) -> str:
        return f"checked: all {self.modules} module names resolve for {LOADERS[self.layout]} ({self.arch})"


def module_names(keys: Iterable[str]) -> list[str]:
    """Return the module names of a network's keys, in first-seen order: stray keys and lone alphas
    (an alpha of a module with no weights, which some trainers write and loaders pass over) left out."""
    seen: dict[str, bool] = {}
    for key in keys:
        split = split_network_key(key)
        if split is not None:
            seen[split[0]] = seen.get(split[0], False) or split[1] != ALPHA
    return [name for name, weighted in seen.items() if weighted]


def _kohya_unresolved(arch: str, modules: list[str]) -> dict[str, str]:
    table = module_table(arch)
    aliases = alias_table(arch)
    result: dict[str, str] = {}
    for name in modules:
        if name in table:
            continue
        target = aliases.get(name)
        if target is not None and target.component == "unet" and name.startswith("lora_unet_"):
            continue  # a denoiser weight outside kohya's table: ComfyUI maps every one, A1111 too
        if target is not None:
            result[name] = "a text-encoder module outside the kohya table: ComfyUI maps only its linear layers"
        else:
            result[name] = "no such module"
    return result


def _diffusers_unresolved(arch: str, modules: list[str]) -> dict[str, str]:
    table = diffusers_table(arch)
    loaded = DIFFUSERS_LOADED.get(arch, ())
    result: dict[str, str] = {}
    for name in modules:
        component = name.partition(".")[0]
        if name not in table:
            result[name] = "no such module"
        elif component not in loaded:
            result[name] = f"the {arch} pipeline loads no LoRA into {component} (T5)"
    return result


def _peft_components(arch: str, path: str) -> set[str]:
    """Return the diffusers components that have a module at `path` (a peft adapter's model path)."""
    table = diffusers_table(arch)
    components = {name.partition(".")[0] for name in table}
    found = set()
    for component in components:
        if f"{component}.{path}" in table or (component.startswith("text_encoder") and f"{component}.text_model.{path}" in table):
            found.add(component)
    return found


def _peft_unresolved(arch: str, modules: list[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    per_module: dict[str, set[str]] = {}
    for name in modules:
        if not name.startswith(_PEFT_PREFIX):
            result[name] = f"not under {_PEFT_PREFIX}"
            continue
        found = _peft_components(arch, name[len(_PEFT_PREFIX):])
        if found:
            per_module[name] = found
        else:
            result[name] = "no such module"
    if per_module:
        common = set.intersection(*per_module.values())
        if not common:  # an adapter wraps one model: the modules of the other models are not applied
            counts: dict[str, int] = {}
            for found in per_module.values():
                for component in found:
                    counts[component] = counts.get(component, 0) + 1
            model = max(sorted(counts), key=counts.get)
            for name, found in per_module.items():
                if model not in found:
                    result[name] = f"a module of {', '.join(sorted(found))}, while the adapter's other modules are in {model}"
    return result


def network_layout(keys: Iterable[str]) -> str | None:
    """Return kohya | diffusers | peft for the key style of a written network, None for another."""
    styles = set()
    for key in keys:
        split = split_network_key(key)
        if split is None:
            continue
        name = split[0]
        if name.startswith(_PEFT_PREFIX):
            styles.add("peft")
        elif name.startswith(("lora_unet_", "lora_te")):
            styles.add("kohya")
        elif name.partition(".")[0] in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
            styles.add("diffusers")
        else:
            styles.add("other")
    return styles.pop() if len(styles) == 1 and styles != {"other"} else None


def check_names(output: Path, layout: str, arch: str | None, header=None, fallback_header=None) -> CheckResult:
    """Check the module names of the network written at `output` (a .safetensors file) for `layout`'s
    loader. arch: the architecture (None: detected from the file, else from `fallback_header`, the
    input's). Raises LytoolsError when there is nothing to check against."""
    from lytools.io import read_header

    header = header if header is not None else read_header(output)
    modules = module_names(header.tensors)
    if not modules:
        raise LytoolsError(f"{output}: --check applies to networks; this file holds no network modules")
    if arch is None:
        arch = _detect(header)
        if arch not in NETWORK_ARCHS and fallback_header is not None:
            arch = _detect(fallback_header)
    if arch not in NETWORK_ARCHS:
        raise LytoolsError(f"{output}: --check cannot check the names: the architecture is not recognised, so there is "
                           f"no loader table to check against; say which with --arch")
    result = CheckResult(layout, arch, len(modules))
    if layout == "kohya":
        result.unresolved = _kohya_unresolved(arch, modules)
    elif layout == "diffusers":
        result.unresolved = _diffusers_unresolved(arch, modules)
    elif layout == "peft":
        result.unresolved = _peft_unresolved(arch, modules)
    else:
        raise LytoolsError(f"{output}: --check knows the names kohya, diffusers and peft loaders read, not a {layout} layout")
    return result


def _detect(header) -> str:
    shapes: Mapping[str, tuple[int, ...]] = {name: info.shape for name, info in header.tensors.items()}
    return detect_network(shapes, header.metadata or {}).arch


# -- after writing: --check and --verify -----------------------------------------------------------------
def examine(source: Path, output: Path, result, options, folder_existed: bool = True) -> None:
    """Run --check (names) and --verify (weights) on what `result` wrote for `source`; add their
    summaries to result.notes. On a failure (or Ctrl-C) everything written is removed (the folder
    of a peft output too, when this run made it) and a LytoolsError names the file and the worst module."""
    from lytools.io import removed_on_failure

    written = list(result.outputs)
    network = written[0] if written else output
    with contextlib.ExitStack() as stack:
        if not folder_existed:
            stack.enter_context(_made_folder_removed(output))  # left last: once the files in it are gone
        for path in written:
            stack.enter_context(removed_on_failure(path))
        if options.check:
            checked = _check(source, network, options)
            result.notes.append(checked.summary())
            result.report["check"] = {"loader": LOADERS[checked.layout], "layout": checked.layout, "arch": checked.arch,
                                      "modules": checked.modules}
        if options.verify:
            from lytools.convert.run import one_torch_thread
            from lytools.convert.verify import verify_cast, verify_network

            with one_torch_thread():
                if options.target is None:
                    verified = verify_cast(source, network, keep_ema=options.keep_ema)
                else:
                    config = written[1] if options.target == "peft" and len(written) > 1 else None
                    verified = verify_network(source, network, options.target, arch=options.arch, fold=options.fold,
                                              component=options.component, config_file=config,
                                              base=options.base if options.flatten_dora else None,
                                              save_dtype=options.save_dtype)
            if not verified.ok:
                raise LytoolsError(verified.message(network))
            result.notes.append(verified.summary())
            result.report["verify"] = verified.as_dict()


@contextlib.contextmanager
def _made_folder_removed(folder: Path):
    """Remove `folder` (a peft adapter folder this run made) when the block fails and it is empty."""
    try:
        yield
    except BaseException:
        if folder.is_dir():
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def precheck_cast(source: Path) -> None:
    """--check without --to keeps the input's names: refuse, before anything is written, a diffusers folder, a
    safetensors file that holds no network modules (a checkpoint) or one in no layout --check knows (ComfyUI's,
    lycoris_), which _check would refuse after the cast."""
    from lytools.io import read_header

    if source.is_dir():
        raise LytoolsError(f"{source}: --check applies to network files, not a diffusers folder; nothing written")
    if source.is_file() and source.name.lower().endswith(".safetensors"):
        header = read_header(source)
        if not detect_network({k: i.shape for k, i in header.tensors.items()}, header.metadata or {}).modules:
            raise LytoolsError(f"{source}: --check applies to networks; this file holds no network modules; nothing written")
        if network_layout(header.tensors) is None:
            raise LytoolsError(f"{source}: --check knows the names kohya, diffusers and peft loaders read; this file's "
                               f"keys are in none of those layouts (convert it with --to); nothing written")


def _check(source: Path, network: Path, options) -> CheckResult:
    from lytools.io import read_header

    if network.is_dir():
        raise LytoolsError(f"{network}: --check applies to network files, not a diffusers folder")
    header = read_header(network)
    if options.target is None and not detect_network({k: i.shape for k, i in header.tensors.items()}, header.metadata or {}).modules:
        raise LytoolsError(f"{network}: --check applies to networks; this file holds no network modules")
    layout = options.target or network_layout(header.tensors)
    if layout is None:
        raise LytoolsError(f"{network}: --check knows the names kohya, diffusers and peft loaders read; "
                           f"this file's keys are in none of those layouts")
    fallback = None
    if options.arch is None and source.is_file() and source.name.lower().endswith(".safetensors"):
        with contextlib.suppress(LytoolsError, OSError):
            fallback = read_header(source)
    checked = check_names(network, layout, options.arch, header=header, fallback_header=fallback)
    if not checked.ok:
        raise LytoolsError(checked.message(network) + "; output removed")
    return checked
