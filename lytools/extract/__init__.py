"""Extraction: a LoRA/LoCon approximating TUNED − BASE (CLI.md `extract`; ALGORITHMS.md §2, §15).

    from lytools.extract import ExtractOptions, RankRule, FactorOptions, extract
    result = extract(base, tuned, out, ExtractOptions(linear=RankRule("fixed", 32)), reporter)
    result.records (per module), result.summary.line(), result.output

Pieces, each usable alone:
    ranks.py   RankRule(mode, value, max_rank), select_rank(σ, rule, out, in·k·k), stores_full
    svd.py     exact_spectrum(M) (float64 Gram eigendecomposition), fixed_rank(M, r) (randomized
               range finder with an error check and exact fallback), robust_svd / robust_eigh
    factor.py  extract_module(name, D, rule, FactorOptions) -> stored tensors + ModuleRecord
               (√σ split, Tucker core, clamping, sparse residual, full `diff`)
    plan.py    plan_extraction(base shapes, tuned shapes) -> paired modules (kohya names for
               sd1/sd2/sdxl/sd3/flux, generic `lora_unet_<path>` names for unknown models)
    pipeline.py extract(...), verify_output(...)
    report.py  summarize(records), write_report(path, records, summary)
"""

from lytools.extract.factor import Extracted, FactorOptions, ModuleRecord, extract_module
from lytools.extract.pipeline import ExtractOptions, ExtractResult, VerifyError, extract, verify_output
from lytools.extract.plan import ExtractPlan, PairedModule, generic_module_name, plan_extraction
from lytools.extract.ranks import MODES, RankRule, select_rank, stores_full
from lytools.extract.report import Summary, summarize, write_report
from lytools.extract.svd import LowRank, SvdFailure, exact_spectrum, fixed_rank, randomized

__all__ = [
    "MODES", "ExtractOptions", "ExtractPlan", "ExtractResult", "Extracted", "FactorOptions", "LowRank",
    "ModuleRecord", "PairedModule", "RankRule", "Summary", "SvdFailure", "VerifyError", "exact_spectrum",
    "extract", "extract_module", "fixed_rank", "generic_module_name", "plan_extraction", "randomized",
    "select_rank", "stores_full", "summarize", "verify_output", "write_report",
]
