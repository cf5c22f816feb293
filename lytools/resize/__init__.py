"""Rank reduction of LoRA/LoCon/DyLoRA networks, fixed and dynamic, without forming dense ΔW
(spec: ../shared/spec/ALGORITHMS.md 16, 12.1, 1.3; CLI.md resize; FORMATS.md 5.3).

    from lytools.resize import ResizeOptions, resize_file
    summary = resize_file("in.safetensors", "out.safetensors", ResizeOptions(rank=16), reporter)
    summary.modules          # [ModuleReport]: rank in/out, alpha in/out, shares of Σσ and ‖·‖_F kept
    summary.line()           # the one-line summary

Per module (modules.resize_module):
* LoRA/LoCon (Tucker `lora_mid` included): SVD of up @ down through thin QR of both factors and
  an r × r core (factors.svd_of_product), O((out + in·K)·r²); rank by kohya's rules
  (ranks.select_rank); up' = U_r Σ_r, down' = V_rᵀ, alpha' = s·r' (0-d), so the scale is kept.
  Modules whose rank is already at or below the target are copied unchanged.
* `--truncate`: leading ranks of nested-rank (DyLoRA) modules, alpha kept, no SVD.
* LoHa, LoKr, full, GLoRA, IA3, OFT/BOFT, DoRA, LoRA with a sparse correction: their ΔW (through
  lytools.algos; the non-additive ones and GLoRA need the base weights) is flattened into a
  LoRA/LoCon of the asked rank by an exact SVD. Norm modules are copied.
"""

from lytools.resize.factors import Spectrum, svd_of_dense, svd_of_product, truncated_factors, tucker_to_flat_down
from lytools.resize.modules import Context, ModuleReport, ModuleResult, RankRule, resize_module
from lytools.resize.pipeline import Network, ResizeOptions, ResizeSummary, read_network, resize_file
from lytools.resize.ranks import DYNAMIC_METHODS, METHODS, MIN_SINGULAR_VALUE, RankChoice, rule_rank, select_rank

__all__ = [
    "Context", "DYNAMIC_METHODS", "METHODS", "MIN_SINGULAR_VALUE", "ModuleReport", "ModuleResult", "Network",
    "RankChoice", "RankRule", "ResizeOptions", "ResizeSummary", "Spectrum", "read_network", "resize_file",
    "resize_module", "rule_rank", "select_rank", "svd_of_dense", "svd_of_product", "truncated_factors",
    "tucker_to_flat_down",
]
