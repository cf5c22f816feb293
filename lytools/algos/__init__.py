"""Every LoRA/LyCORIS algorithm's weight change, detected from keys and shapes
(spec: ../shared/spec/ALGORITHMS.md; conventions: docs/conventions.md).

One file per algorithm, all of the same shape: `SUFFIXES`, `detect(shapes)`,
`describe(name, shapes, scalars) -> ModuleInfo`, and either `delta(module, target_shape)`
(additive: lora, loha, lokr, full, norm, glora) or `merge(module, weight, ratio)` (ia3, oft, boft);
`dora.py` and `sparse.py` add to those. `detect.ALGORITHMS` is the table algo -> functions.
No classes with state, nothing registered at import.

Typical use (what merge, resize, convert, extract and info call):

    from lytools.algos import NetworkModule, group_keys, describe_header, apply_module, delta

    groups = group_keys(reader.keys())          # {lora_name: {suffix: full key}}, .stray
    info = describe_header(name, {suffix: (shape, dtype), ...}, alpha=2.0)   # header only
    module = NetworkModule(name, {suffix: tensor, ...})
    merged = apply_module(module, weight, bias, ratio=0.7, device="cuda", precision="float32")
    merged.weight, merged.bias                  # cast back to the input dtypes
    if is_additive(module):
        change = delta(module, weight.shape)    # ΔW, scale included, ratio excluded, float32
    fused = apply_to_rows(module, qkv_weight, slice(0, 3072), ratio=1.0)

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
from lytools.algos.common import ModuleInfo, NetworkModule, read_scalar, scale_for
from lytools.algos.detect import (
    ALGORITHMS, KNOWN_SUFFIXES, Algorithm, describe_header, describe_module, describe_shapes,
)
from lytools.algos.dora import DORA_MODES
from lytools.algos.keys import KNOWN_PREFIXES, KeyGroups, group_keys, module_prefix, split_key

__all__ = [
    "ALGORITHMS", "Algorithm", "DORA_MODES", "KNOWN_PREFIXES", "KNOWN_SUFFIXES", "KeyGroups", "Merged",
    "ModuleInfo", "NetworkModule", "apply_module", "apply_to_rows", "bias_delta", "delta",
    "describe_header", "describe_module", "describe_shapes", "group_keys", "is_additive",
    "module_prefix", "read_scalar", "scale_for", "split_key",
]
