"""Every LoRA/LyCORIS algorithm's weight change, detected from keys and shapes
(spec: ../shared/spec/ALGORITHMS.md; conventions: docs/conventions.md).

One file per algorithm, all of the same shape: `SUFFIXES`, `detect(shapes)`,
`describe(name, shapes, scalars) -> ModuleInfo`, and either `delta(module, target_shape)`
(additive: lora, loha, lokr, full, norm, glora) or `merge(module, weight, ratio)` (ia3, oft, boft);
`dora.py` and `sparse.py` add to those. `detect.ALGORITHMS` is the table algo -> functions.
No classes with state, nothing registered at import.

Typical use (what merge, resize, convert, extract and info call), with `source` an open
lytools.io file:

    from lytools.algos import apply_module, delta, describe_header, group_keys, load_module

    groups = group_keys(source.keys())  # .modules {lora_name: {suffix: full key}}, .stray [keys]
    for name, keys in groups.modules.items():
        # header only (info): entries may be TensorInfo, (shape, dtype) or bare shapes
        info = describe_header(name, {s: source.info(k) for s, k in keys.items()}, alpha=alpha)
        module = load_module(source, name, keys)  # NetworkModule(name, {suffix: tensor})
        merged = apply_module(module, weight, bias, ratio=0.7, device="cuda", precision="float32")
        # merged.weight / merged.bias: cast once to the input dtypes, on weight's device
        if info.additive:
            change = delta(module, weight.shape)  # ΔW: scale in, ratio out; float32
    fused = apply_to_rows(module, qkv_weight, slice(0, 3072), ratio=1.0)  # one part of q;k;v

`apply_module(..., dora_mode="comfy")` selects ComfyUI's DoRA strength rule instead of LyCORIS's.

Records:

* `NetworkModule(name, tensors)` — one module's tensors keyed by suffix (`lora_up.weight`).
* `ModuleInfo` — algo (`lora`, `loha`, `lokr`, `full`, `ia3`, `glora`, `oft`, `boft`, `norm`,
  `tlora`), rank, alpha, scale, kernel, tucker, delta_shape, blocks, constraint, lokr_w1,
  lokr_full, on_input, variant, dora axis, sparse_bias, additive, needs_weight, bias_delta,
  mergeable.
* `Merged(weight, bias)` — what `apply_module` returns.

Errors: `NetworkError` for incomplete, inconsistent or unknown modules (the message starts with
`module <lora_name>:`; callers add the file name); `UnsupportedError` for T-LoRA merges and for
`delta` of non-additive modules.
"""

from lytools.algos.apply import Merged, apply_module, apply_to_rows, bias_delta, delta, is_additive
from lytools.algos.common import ModuleInfo, NetworkModule, check_finite, read_scalar, scale_for
from lytools.algos.detect import (
    ALGORITHMS, KNOWN_SUFFIXES, Algorithm, describe_header, describe_module, describe_shapes,
)
from lytools.algos.dora import DORA_MODES
from lytools.algos.keys import KNOWN_PREFIXES, KeyGroups, group_keys, load_module, module_prefix, split_key

__all__ = [
    "ALGORITHMS", "Algorithm", "DORA_MODES", "KNOWN_PREFIXES", "KNOWN_SUFFIXES", "KeyGroups", "Merged",
    "ModuleInfo", "NetworkModule", "apply_module", "apply_to_rows", "bias_delta", "check_finite", "delta",
    "describe_header", "describe_module", "describe_shapes", "group_keys", "is_additive",
    "load_module", "module_prefix", "read_scalar", "scale_for", "split_key",
]
