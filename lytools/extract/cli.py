"""The body of `lytools extract` (lytools/cli.py keeps only the option declarations)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import click

from lytools.extract.options import build_options
from lytools.extract.pipeline import NONFINITE, extract
from lytools.io import parse_save_dtype
from lytools.io.metadata import command_line
from lytools.ui import Reporter

OPTION_NAMES = (
    "mode", "linear_dim", "conv_dim", "linear_threshold", "conv_threshold", "linear_ratio", "conv_ratio",
    "linear_quantile", "conv_quantile", "max_rank", "min_diff", "unet", "text_encoder", "clamp_quantile",
    "tucker", "sparse_bias", "sparsity", "full_fallback", "arch", "device", "verify", "overwrite", "report",
)


def run_extract_command(values: Mapping[str, Any], reporter: Reporter) -> None:
    """Run extract with the command's parsed values; print the output path (or JSON) on stdout."""
    options = build_options(save_dtype=parse_save_dtype(values["save_dtype"]),
                            **{name: values[name] for name in OPTION_NAMES})
    options = replace(options, command=command_line(), strip_metadata=values["strip_metadata"])
    result = extract(values["base"], values["tuned"], values["output"], options, reporter)
    summary = result.summary
    reporter.log(f"extract: {summary.line()} in {result.seconds:.1f} s")
    if summary.skip_reasons:
        reporter.log("extract: skipped: " + ", ".join(f"{count} {why}" for why, count in sorted(summary.skip_reasons.items())))
    if values["sparse_bias"]:
        reporter.log("extract: the sparse corrections (bias_indices/bias_values/bias_size) are applied by lytools merge "
                     "only; ComfyUI, A1111/Forge and LyCORIS load the low-rank part without them")
    if summary.full:
        # LyCORIS `diff` modules: diffusers' kohya converter raises on them and kohya's scripts skip them
        # (FORMATS.md 7), so the network is no longer one every loader the help names can read
        fallback = values["mode"] != "full"
        message = (f"{summary.full} module(s) are stored whole (LyCORIS `diff`"
                   + (", their rank reached half their outputs" if fallback else "") + "): ComfyUI, A1111/Forge and "
                   "LyCORIS load them, diffusers' load_lora_weights and kohya's scripts do not"
                   + ("; --no-full-fallback keeps every module low-rank" if fallback else ""))
        if fallback:
            reporter.warn(message)
        else:
            reporter.log(f"extract: {message}")
    failed = summary.skip_reasons.get("failed", 0)
    nonfinite = [r for r in result.records if r.stored == "skipped" and NONFINITE in (r.reason or "")]
    if nonfinite:
        # a broken input (a fine-tune that diverged), not a decomposition problem: name the file
        names = {"BASE": Path(values["base"]).name, "TUNED": Path(values["tuned"]).name}
        files = sorted({names[which] for r in nonfinite for which in names if which in r.reason})
        where = f"the weights of {' and '.join(files)} hold them"
        reporter.warn(f"{len(nonfinite)} module(s) were left out for NaN or infinite values ({where}), "
                      f"e.g. {nonfinite[0].name}")
    if failed - len(nonfinite):
        reporter.warn(f"{failed - len(nonfinite)} module(s) could not be decomposed and were left out (see --report)")
    if result.verified is not None:
        reporter.log(f"extract: verified {result.verified} modules against the difference")
    if result.uncovered:
        reporter.log(f"extract: {len(result.uncovered)} other tensors differ that a LoRA does not hold (biases, norms, "
                     f"embeddings, conv_in/out...), e.g. {', '.join(result.uncovered[:3])}")
    if values["as_json"]:
        click.echo(json.dumps({
            "output": str(result.output),
            "seconds": round(result.seconds, 3),
            "summary": {
                "extracted": summary.extracted, "low_rank": summary.low_rank, "full": summary.full,
                "skipped": summary.skipped, "retained_energy": summary.retained_energy,
                "mean_rel_error": summary.mean_rel_error, "worst": summary.worst,
                "skip_reasons": summary.skip_reasons, "verified": result.verified,
                "uncovered_changes": len(result.uncovered), "uncovered_examples": result.uncovered[:20],
            },
            "modules": [record.as_dict() for record in result.records],
        }, indent=1))
    else:
        click.echo(str(result.output))
