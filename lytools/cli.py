"""The lytools command line: parse, call the library, report. No math here."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

import click

from lytools import __version__
from lytools.errors import LytoolsError, debugging, os_error_line
from lytools.io.metadata import set_invocation
from lytools.ui import Reporter

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- shared options and helpers ---------------------------------------------------------------
def verbosity_options(func):
    """-q/--quiet and -v/--verbose; the command receives `reporter`."""
    func = click.option("-v", "--verbose", "verbose", count=True, help="More detail on stderr (repeatable).")(func)
    func = click.option("-q", "--quiet", is_flag=True, help="No progress or logs on stderr.")(func)
    return func


def make_reporter(quiet: bool, verbose: int) -> Reporter:
    if quiet and verbose:  # one of them would be ignored
        raise click.UsageError("-q/--quiet and -v/--verbose contradict each other; give one")
    return Reporter(0 if quiet else 1 + verbose)


device_option = click.option(
    "--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
    help="Where to compute: auto takes CUDA when present, else CPU.",
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
keep_ema_option = click.option("--keep-ema", is_flag=True,
                               help="Keep a pickled (.ckpt) checkpoint's EMA copy (model_ema.*), which is left out by default.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
strip_metadata_option = click.option(
    "--strip-metadata", is_flag=True,
    help="Write no training record (ss_*), modelspec, provenance (lytools.*), hashes or file names: only what "
         "loaders read to apply the weights (diffusers' lora_adapter_metadata; a checkpoint's format; a diffusers "
         "folder's configs less _name_or_path). Inputs are not hashed.",
)


def save_dtype_option(default: str | None = None, fp8: bool = False, default_help: str = "the input's dtype"):
    choices = ["fp32", "fp16", "bf16"] + (["fp8_e4m3", "fp8_e5m2"] if fp8 else [])
    return click.option(
        "--save-dtype", type=click.Choice(choices), default=default, show_default=default is not None,
        help="dtype of floating tensors written (integer tensors keep theirs)"
        + ("" if default else f"; default: {default_help}") + ".",
    )


class OutputFile(click.ParamType):
    """An output that is always a file (extract/resize OUT, --report): a trailing separator, which Path would drop,
    is refused as lytools.io.output_file_path refuses it (exit 1, as an existing folder is, when the command
    runs). Outputs that may be folders (merge -o, convert -o) are passed on as typed, for the command to judge."""

    name = "file"

    def convert(self, value, param, ctx):
        from lytools.io import output_file_path

        return value if isinstance(value, Path) else output_file_path(value)


OUTPUT_FILE = OutputFile()


def expand_inputs(paths: tuple[str, ...]) -> list[Path]:
    """Return input paths, with `-` replaced by the lines of stdin (one path per line; only the line
    ending is removed, so a name may begin or end with spaces; blank lines are skipped)."""
    result: list[Path] = []
    for path in paths:
        if path == "-":
            lines = (line.rstrip("\r\n") for line in sys.stdin)
            result.extend(Path(line) for line in lines if line.strip())
        else:
            result.append(Path(path))
    return [input_file(path) for path in result]


def input_file(path: Path) -> Path:
    """Return the file to read for an input path: a peft adapter folder's adapter file
    (lytools.io.folders.peft_adapter_file; its adapter_config.json beside it gives the scale), else the path itself."""
    from lytools.io.folders import peft_adapter_file

    return peft_adapter_file(path) or path


# -- the group --------------------------------------------------------------------------------
@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="lytools")
def cli() -> None:
    """Offline toolkit for LoRA and LyCORIS files: what a file is (info), extract, merge, resize
    and convert; `lytools demo` runs them all on a tiny synthetic model. Every command streams
    tensors one at a time."""


# -- extract ----------------------------------------------------------------------------------
@cli.command("extract")
@click.argument("base", metavar="BASE", type=click.Path(path_type=Path, readable=False))  # a folder: diffusers / sharded
@click.argument("tuned", metavar="TUNED", type=click.Path(path_type=Path, readable=False))
@click.argument("output", metavar="OUT", type=OUTPUT_FILE)
@click.option("--mode", type=click.Choice(["fixed", "threshold", "ratio", "quantile", "full"]), default="fixed",
              show_default=True, help="Rank rule (ALGORITHMS.md 15); full stores each changed module whole (diff).")
@click.option("--linear-dim", type=click.IntRange(min=0), metavar="N", help="fixed: rank of linear and 1x1 modules [default: 32].")
@click.option("--conv-dim", type=click.IntRange(min=0), metavar="N",
              help="fixed: rank of kxk convs [default: 32]; 0 skips kxk convs (any mode).")
@click.option("--linear-threshold", type=click.FloatRange(min=0), metavar="F", help="threshold: keep singular values > F (default: the conv one).")
@click.option("--conv-threshold", type=click.FloatRange(min=0), metavar="F", help="threshold for kxk convs (default: the linear one).")
@click.option("--linear-ratio", type=click.FloatRange(0, 1), metavar="F", help="ratio: keep singular values > F times the largest (default: the conv one).")
@click.option("--conv-ratio", type=click.FloatRange(0, 1), metavar="F", help="ratio for kxk convs (default: the linear one).")
@click.option("--linear-quantile", type=click.FloatRange(0, 1), metavar="F",
              help="quantile: keep the singular values whose cumulative sum stays below F of their total "
                   "(LyCORIS's rule: one fewer than the smallest prefix reaching F; at least 1; default: the conv one).")
@click.option("--conv-quantile", type=click.FloatRange(0, 1), metavar="F", help="quantile for kxk convs (default: the linear one).")
@click.option("--max-rank", type=click.IntRange(min=1), metavar="N", help="Cap on the ranks of the dynamic modes.")
@click.option("--min-diff", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="F",
              help="Skip (and report) modules whose largest |difference| is <= F.")
@click.option("--unet/--no-unet", default=True, show_default=True, help="Extract the UNet/transformer modules.")
@click.option("--text-encoder/--no-text-encoder", default=True, show_default=True, help="Extract the text encoder modules.")
@click.option("--clamp-quantile", type=float, metavar="F",
              help="Clamp the factors at this quantile of their values, like kohya (0.99); off by default; the report gives the error it adds.")
@click.option("--tucker/--no-tucker", default=False, show_default=True, help="kxk convs as a Tucker core (lora_mid) with 1x1 up/down.")
@click.option("--sparse-bias", is_flag=True, help="Also store the largest residuals as a sparse correction (bias_indices/values/size), "
                   "as LyCORIS's extractor does; only lytools merge applies it (UIs load the low-rank part).")
@click.option("--sparsity", type=float, metavar="F", help="With --sparse-bias: share of residual entries dropped [default: 0.98].")
@click.option("--full-fallback/--no-full-fallback", default=True, show_default=True,
              help="Store a module whole when its rank is >= out/2 (LyCORIS's rule; the pair would not be smaller).")
@click.option("--arch", type=click.Choice(["auto", "sd1", "sd2", "sdxl", "sd3", "flux"]), default="auto", show_default=True,
              help="Architecture whose kohya names to write; auto detects it (unknown models get generic names). "
                   "For checkpoints detected as unknown; one that contradicts the detected architecture is an error.")
@click.option("--report", type=OUTPUT_FILE, metavar="FILE.json|FILE.csv",
              help="Per-module rank, alpha, relative Frobenius error and retained energy.")
@click.option("--verify", is_flag=True, help="Reload the output and check every module against its difference.")
@device_option
@save_dtype_option("fp16")
@strip_metadata_option
@overwrite_option
@json_option
@verbosity_options
def extract_command(base, tuned, output, mode, linear_dim, conv_dim, linear_threshold, conv_threshold, linear_ratio,
                    conv_ratio, linear_quantile, conv_quantile, max_rank, min_diff, unet, text_encoder, clamp_quantile,
                    tucker, sparse_bias, sparsity, full_fallback, arch, report, verify, device, save_dtype, strip_metadata,
                    overwrite, as_json, quiet, verbose):
    """A LoRA/LoCon OUT approximating TUNED - BASE (kohya names, loadable by ComfyUI, A1111/Forge,
    kohya, LyCORIS and diffusers). Summary on stderr; the path (or --json) on stdout."""
    from lytools.extract.cli import run_extract_command

    run_extract_command(locals(), make_reporter(quiet, verbose))


# -- resize -----------------------------------------------------------------------------------
@cli.command("resize")
@click.argument("source", metavar="IN", type=click.Path(path_type=Path, readable=False))  # a peft adapter folder too
@click.argument("output", metavar="OUT", type=OUTPUT_FILE)
@click.option("--rank", type=int, help="New rank (fixed) or rank cap (dynamic methods) of linear and 1x1 modules.")
@click.option("--conv-rank", type=int, help="The same for kxk conv modules (default: --rank).")
@click.option("--method", type=click.Choice(["fixed", "sv_ratio", "sv_fro", "sv_cumulative"]), default="fixed",
              show_default=True, help="Rank rule, as kohya's resize tool defines it.")
@click.option("--method-param", type=float, metavar="F",
              help="sv_ratio: largest/smallest kept singular value (at least 1); sv_fro, sv_cumulative: share kept (0..1).")
@click.option("--max-rank", type=int, help="Cap on the ranks the dynamic methods pick.")
@click.option("--truncate", is_flag=True, help="DyLoRA / nested-rank files: keep the first N ranks, no SVD.")
@click.option("--base", type=click.Path(path_type=Path, readable=False), metavar="CHECKPOINT",
              help="Base model: needed to flatten DoRA, IA3, OFT/BOFT and GLoRA modules.")
@click.option("--report", type=OUTPUT_FILE, metavar="FILE.json|FILE.csv",
              help="Per-module rank, alpha and shares of the spectrum kept.")
@click.option("--verify", is_flag=True, help="Reload the output and check every module against its input.")
@device_option
@save_dtype_option()
@strip_metadata_option
@overwrite_option
@json_option
@verbosity_options
def resize_command(source, output, rank, conv_rank, method, method_param, max_rank, truncate, base, report, verify,
                   device, save_dtype, strip_metadata, overwrite, as_json, quiet, verbose):
    """Reduce the ranks of a LoRA/LoCon/DyLoRA network IN into OUT (other algorithms are flattened
    into a LoRA). -v prints every module's rank and retained Frobenius share.

    The dynamic methods pick ranks as kohya's resize tool long did, including its +1: one singular
    value more than the definition's count (sv_fro 0.9 keeps the smallest prefix reaching 90% of
    the Frobenius norm, plus one; sd-scripts since its PR #2194 keeps one fewer), capped by
    --rank/--conv-rank and --max-rank, and never above a module's own rank."""
    import json

    from lytools.io import parse_save_dtype
    from lytools.resize import ResizeOptions, resize_file

    reporter = make_reporter(quiet, verbose)
    options = ResizeOptions(
        rank=rank, conv_rank=conv_rank, method=method, method_param=method_param, max_rank=max_rank,
        truncate=truncate, base=base, report=report, device=device, save_dtype=parse_save_dtype(save_dtype),
        verify=verify, overwrite=overwrite, strip_metadata=strip_metadata,
    )
    summary = resize_file(input_file(source), output, options, reporter)
    reporter.log(summary.line())
    if as_json:
        click.echo(json.dumps({"output": str(summary.output), "modules": [m.as_row() for m in summary.modules],
                               "warnings": summary.warnings, "seconds": round(summary.seconds, 3)}))
    else:
        click.echo(str(summary.output))


# -- merge ------------------------------------------------------------------------------------
from lytools.merge.options import ratios_option  # noqa: E402  (click plumbing for --ratios R...)


@cli.command("merge")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("-o", "--output", type=click.Path(path_type=str), metavar="OUT",
              help="Output .safetensors (required unless --dry-run); a folder when the checkpoint is a diffusers folder.")
@ratios_option
@click.option("--ratio-for", "ratio_for", multiple=True, metavar="REGEX=R",
              help="Scale modules whose name matches REGEX by R, on top of their input's ratio (repeatable).")
@click.option("--allow-unmatched", is_flag=True, help="Warn (with the count) instead of failing when modules match no tensor.")
@click.option("--rank", type=int, help="Networks into one network: re-factor the summed change by SVD to this rank.")
@click.option("--conv-rank", type=int, help="The same for kxk conv modules (default: --rank).")
@click.option("--dry-run", is_flag=True, help="Print the plan (matched modules per input, unmatched ones, output size); write nothing.")
@click.option("--verify", is_flag=True, help="Reload the output and check it against the intended change.")
@click.option("--dora-mode", type=click.Choice(["lycoris", "comfy"]), default=None,
              help="DoRA modules at a ratio other than 1, into a checkpoint: lycoris (default; the reference "
                   "LyCORIS merge: full direction change, magnitude interpolated) or comfy (ComfyUI: "
                   "base + ratio x (full DoRA result - base)). Both agree at ratio 1.")
@keep_ema_option
@device_option
@save_dtype_option(default_help="the checkpoint's dtypes; networks into one network: the widest float dtype of "
                                "their factors, fp16 when all are fp8")
@strip_metadata_option
@overwrite_option
@json_option
@verbosity_options
def merge_command(inputs, output, ratios, ratio_for, allow_unmatched, rank, conv_rank, dry_run, verify, dora_mode, keep_ema,
                  device, save_dtype, strip_metadata, overwrite, as_json, quiet, verbose):
    """Merge networks into a checkpoint (first INPUT a checkpoint), or networks into one network.
    Any algorithm and key style; `-` reads paths from stdin."""
    import json

    from lytools.io import parse_save_dtype
    from lytools.merge import parse_ratios, run_merge

    # --dry-run prints its plan on stdout, where -v adds each module's line: -q (stderr) does not contradict it
    reporter = make_reporter(quiet, 0 if dry_run and quiet else verbose)
    paths = expand_inputs(inputs)
    if not paths:  # `-` with nothing on stdin (an empty find): a usage error, as for info and convert
        raise click.UsageError("no input files")
    result = run_merge(
        paths, output, ratios=parse_ratios(ratios), ratio_for=ratio_for,
        allow_unmatched=allow_unmatched, rank=rank, conv_rank=conv_rank, save_dtype=parse_save_dtype(save_dtype),
        device=device, dry_run=dry_run, overwrite=overwrite, verify=verify, dora_mode=dora_mode, keep_ema=keep_ema,
        strip_metadata=strip_metadata, reporter=reporter,
    )
    if not dry_run:  # stderr, with or without --json
        for line in (result.plan.lines() if hasattr(result, "plan") else result.lines(verbose=True)):
            reporter.detail(line)
        reporter.log(result.summary())
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    elif dry_run:  # the plan is the result; -v adds each module's planned method and rank (networks)
        click.echo("\n".join(result.plan.lines() if hasattr(result, "plan") else result.lines(verbose=verbose > 0)))
    else:
        click.echo(str(result.output))


@cli.command("info")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@json_option
@click.option("--hash", "with_hashes", is_flag=True, help="Also compute sha256, AutoV2, AutoV3/sshs_model_hash and legacy hashes (reads the whole file).")
@click.option("--verify", is_flag=True, help="Compute the hashes and fail when an embedded sshs_*/modelspec hash does not match the file.")
@click.option("-v", "--verbose", is_flag=True, help="Per-block rank and alpha, full metadata values.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar on stderr (--hash and --verify show one over the files).")
def info_command(files, as_json, with_hashes, verify, verbose, quiet):
    """What each FILE is, from its header: kind, architecture, key layout, modules per algorithm,
    rank/alpha, dtypes, sizes and metadata. `-` reads paths from stdin."""
    from lytools.info import format_report, inspect_files, verify_problems

    paths = expand_inputs(files)
    if not paths:
        raise click.UsageError("no input files")
    results, failed = [], False
    reports = inspect_files(paths, hashes=with_hashes or verify, verbose=verbose)
    if with_hashes or verify:  # reads every file whole: worth a bar on a terminal
        reports = make_reporter(quiet, 0).progress(reports, total=len(paths), desc="hash")
    for index, (path, report, error) in enumerate(reports):
        if error is not None:
            failed = True
            click.echo(f"lytools: error: {error}", err=True)
            results.append({"path": str(path), "error": error})
            continue
        for problem in verify_problems(report) if verify else []:
            failed = True
            click.echo(f"lytools: error: {problem}", err=True)
        if as_json:
            results.append(report)
        else:
            click.echo(("\n" if index else "") + format_report(report, verbose=verbose))
    if as_json:
        import json

        click.echo(json.dumps(results, indent=2))
    if failed:
        sys.exit(1)  # after every file was reported (click's Exit is swallowed in non-standalone mode)


# -- convert ----------------------------------------------------------------------------------
@cli.command("convert")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("-o", "--output", type=click.Path(path_type=str), metavar="OUT",
              help="Output for a single INPUT. With --to peft: a folder (OUT/adapter_model.safetensors + "
                   "adapter_config.json), or OUT.safetensors with OUT.adapter_config.json beside it.")
@click.option("--output-dir", type=click.Path(path_type=Path), metavar="DIR",  # a file there: exit 1, as for -o
              help="Folder for many inputs, created when missing: DIR/<input name>.safetensors; with --to peft "
                   "DIR/<input name>/adapter_model.safetensors + adapter_config.json.")
@click.option("--to", "target", type=click.Choice(["kohya", "diffusers", "peft"]),
              help="Key layout to write. Omit it to change only the dtype (--save-dtype) of any file, "
                   "networks and checkpoints alike, streamed tensor by tensor.")
@click.option("--fold/--no-fold", default=None,
              help="Fold alpha/rank into the factors (default for diffusers and peft: every loader then agrees; "
                   "kohya: alpha = rank). --no-fold keeps the factors bit-exact and carries the scale in "
                   "lora_adapter_metadata / adapter_config.json (lora_alpha, alpha_pattern), which diffusers "
                   "and peft read but ComfyUI/Forge do not (they would apply scale 1).")
@click.option("--component", type=click.Choice(["unet", "te", "te1", "te2", "te3"]),
              help="peft: the one model the adapter is for when the network covers several.")
@click.option("--arch", type=click.Choice(["auto", "sd1", "sd2", "sdxl", "sd3", "flux"]), default="auto", show_default=True,
              help="Architecture of the inputs when detection cannot tell (with --to).")
@click.option("--flatten-dora", is_flag=True,
              help="With --to and --base: replace every DoRA module by a plain LoRA of the rank of its own weight change (LoRA r, LoHa r², "
                   "LoKr the product of its halves' ranks; at most the layer's full rank) approximating W' - W at "
                   "strength 1 on --base, by SVD, with the error reported; other modules are written as they are. For "
                   "A1111/Forge and ComfyUI, which do not apply output-axis DoRA exactly, and for diffusers/peft, which "
                   "hold no input-axis DoRA. Exact at strength 1 on that base only. Another rank: lytools resize --base.")
@click.option("--base", type=click.Path(path_type=Path, readable=False), metavar="CHECKPOINT",
              help="With --flatten-dora: the base model the DoRA modules were trained on (read one weight at a time, "
                   "shared by every input).")
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=1, show_default=True, help="Files converted in parallel processes.")
@click.option("--fsync", "fsync", is_flag=True,
              help="Flush each output to disk before printing its path, so a power cut cannot lose it. Without it "
                   "outputs are still written to a temporary file and renamed (never partial after an error or "
                   "Ctrl-C), and the system writes them back in its own time, as cp does.")
@click.option("--verify", is_flag=True,
              help="Reload each output the way its target loader reads it (kohya: alpha/rank, no alpha: 1; diffusers: "
                   "lora_adapter_metadata; peft: adapter_config.json r, lora_alpha, patterns, use_dora) and compare every "
                   "module's weight change with the input's, row for row of the layer's weight (fused and split q/k/v "
                   "alike; no checkpoint needed): exact where nothing should round (same dtype, no fold or a power-of-two one), else "
                   "within the output dtype's rounding. Without --to: every tensor must be the input's cast to the "
                   "written dtype. With --flatten-dora the flattened modules are compared with the flattening done again on "
                   "--base. A failing output is removed and named with its worst module (exit 1).")
@click.option("--check", is_flag=True,
              help="Fail (exit 1, output removed, the first unresolved modules named) when a module of an output "
                   "would not be applied by the loader of its layout, since ComfyUI and A1111 skip unknown keys silently: "
                   "kohya names against the kohya table ComfyUI, A1111 and Forge map (other denoiser weights, such as "
                   "the LyCORIS full preset's, count as applied; text-encoder ones outside it do not); diffusers/peft paths against the diffusers modules of a "
                   "component the pipeline loads LoRA into (T5 is not). An unknown architecture is an error (--arch). "
                   "Checks what is written; without --to, the names as the input stores them (networks only: a "
                   "checkpoint is refused before it is cast).")
@save_dtype_option(fp8=True)
@keep_ema_option
@strip_metadata_option
@overwrite_option
@json_option
@verbosity_options
def convert_command(inputs, output, output_dir, target, fold, component, arch, flatten_dora, base, jobs, fsync, verify, check, save_dtype, keep_ema,
                    strip_metadata, overwrite, as_json, quiet, verbose):
    """Rewrite networks in another key layout (kohya, diffusers, peft) and/or dtype, or cast checkpoints.

    Reads every layout lytools knows (kohya/LyCORIS, lycoris_, diffusers, peft, ComfyUI, old diffusers).
    Each written path is printed on stdout as soon as it is done; `-` reads input paths from stdin
    (`find . -name '*.safetensors' | lytools convert - --output-dir out --to diffusers -j 4`).
    A file that fails is reported on stderr and skipped; the exit code is 1 when any failed.
    Stray keys are kept for kohya and dropped (named) for diffusers/peft; algorithms the target cannot
    hold (LoHa, LoKr, ... for diffusers/peft) are an error pointing to `lytools resize`.
    --check (names) and --verify (weights) test each output once written; one that fails is removed.
    """
    # convert uses numpy for elementwise work only; numpy's OpenBLAS would start a thread per core
    # on import that spins for about 0.1 s of CPU, taken from the --jobs workers on small machines.
    # (Set here, not for every command: some torch builds use OpenBLAS for extract's and resize's SVDs.)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import json

    from lytools.convert import ConvertOptions, make_output_dir, plan_outputs, remove_empty_dirs, run_batch
    from lytools.io.folders import PEFT_ADAPTER_FILES
    from lytools.io import parse_save_dtype

    reporter = make_reporter(quiet, verbose)
    sources = expand_inputs(inputs)
    if not sources:
        raise click.UsageError("no input files")
    if target is None and save_dtype is None:
        raise click.UsageError("nothing to do: give --to kohya|diffusers|peft and/or --save-dtype")
    if target is None and (fold is not None or component is not None or arch != "auto"):
        raise click.UsageError("--fold/--no-fold, --component and --arch need --to (a cast with --save-dtype alone "
                               "keeps every key as it is)")
    if keep_ema and target is not None:
        raise click.UsageError("--keep-ema applies to casting a checkpoint (--save-dtype without --to)")
    if component is not None and target != "peft":
        raise click.UsageError("--component applies to --to peft")
    if flatten_dora and (base is None or target is None):
        raise click.UsageError("--flatten-dora needs --to LAYOUT and --base CHECKPOINT (the model the DoRA was trained on)")
    if base is not None and not flatten_dora:
        raise click.UsageError("--base is the checkpoint --flatten-dora flattens DoRA on; without --flatten-dora nothing reads it")
    if output is not None and len(sources) > 1:
        raise click.UsageError(f"-o takes one input ({len(sources)} given); use --output-dir DIR")
    options = ConvertOptions(target=target, save_dtype=parse_save_dtype(save_dtype), fold=fold, component=component,
                             arch=None if arch == "auto" else arch, overwrite=overwrite, fsync=fsync,
                             verify=verify, check=check,
                             keep_ema=keep_ema, strip_metadata=strip_metadata, flatten_dora=flatten_dora, base=base)
    pairs = plan_outputs(sources, output, output_dir, target)
    if flatten_dora:  # opened once here (a bad base fails before any file), shared by every file and worker
        from lytools.convert.dora import check_base

        check_base(base, [out for _, out in pairs])
    created = make_output_dir(output_dir) if output_dir is not None else []

    def done(result) -> None:
        if result.error:
            click.echo(f"lytools: error: {result.error}", err=True)
            return
        name = result.source.name  # a peft adapter folder's file is named with its folder: every one has this name
        if name in PEFT_ADAPTER_FILES and result.source.parent.name:
            name = f"{result.source.parent.name}/{name}"
        for note in result.notes:
            reporter.log(f"{name}: {note}")
        for line in result.details:
            reporter.detail(f"{name}: {line}")
        for warning in result.warnings:
            reporter.warn(f"{name}: {warning}")
        reporter.detail(f"{name}: done in {result.seconds:.3f} s")
        if not as_json:
            for path in result.outputs:
                click.echo(str(path))
                sys.stdout.flush()

    try:
        results = run_batch(pairs, options, jobs=jobs, on_done=done)
    finally:  # every file failed, or Ctrl-C came before one was written: the folders created for them go too
        remove_empty_dirs(created)
    failed = sum(1 for r in results if r.error)
    if len(results) > 1:
        reporter.log(f"convert: {len(results) - failed} written, {failed} failed")
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    if failed:
        sys.exit(1)


# -- demo -------------------------------------------------------------------------------------
@cli.command("demo")
@click.argument("folder", metavar="[DIR]", required=False, default="lytools-demo",
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Reuse DIR even when it already holds files.")
@verbosity_options
def demo_command(folder, overwrite, quiet, verbose):
    """Build a tiny synthetic SD1 base and fine-tune in DIR (default ./lytools-demo) and run
    info, extract, resize, merge and convert on them, printing each step with its figures."""
    from lytools.demo import run_demo

    reporter = make_reporter(quiet, verbose)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise LytoolsError(f"{folder}: already holds files (use --overwrite, or name another DIR)")

    def invoke(args: list[str]) -> None:
        if quiet:
            args = args + ["-q"]
        elif verbose:
            args = args + ["-v"]  # info's -v is a flag, the others count
        set_invocation(args)
        cli.main(args=args, prog_name="lytools", standalone_mode=False)

    run_demo(folder, invoke, reporter, set(cli.commands))


# -- entry point ------------------------------------------------------------------------------
def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run the CLI, turning every lytools error into one stderr line and an exit code."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    debug = debugging()
    try:
        set_invocation(sys.argv[1:] if argv is None else argv)
        code = cli.main(args=argv, prog_name="lytools", standalone_mode=False)
        # non-standalone click returns the code of a ctx.exit(N) instead of raising
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("lytools: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except LytoolsError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"lytools: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("lytools: interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        click.echo("lytools: error: out of memory", err=True)
        sys.exit(1)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(1)
    except OSError as exc:  # an I/O error (CLI.md: exit 1) is no internal error: say the file and the reason
        if debug:
            traceback.print_exc()
        click.echo(f"lytools: error: {os_error_line(exc)}", err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if debug:
            traceback.print_exc()
        name = type(exc).__name__
        if "OutOfMemory" in name:
            click.echo(f"lytools: error: out of memory on the device ({str(exc).splitlines()[0][:200]})", err=True)
        else:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            click.echo(f"lytools: error: internal error {name}: {first} (set LYTOOLS_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)
