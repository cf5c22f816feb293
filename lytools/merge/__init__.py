"""`lytools merge`: networks into a checkpoint, or networks into one network.

    from lytools.merge import run_merge, merge_into_checkpoint, merge_networks

    result = run_merge(["base.safetensors", "a.safetensors", "b.safetensors"], "out.safetensors",
                       ratios=[0.5, -0.3], ratio_for=["input_blocks_[0-3]_=0"])
    result.as_dict()      # what --json prints; result.plan.lines() / result.lines() for --dry-run

* Into a checkpoint (first input a checkpoint; checkpoint.py): plan from headers (plan.py), then
  stream tensor by tensor; every algorithm lytools.algos knows, applied in input order; fused
  q/k/v rows; fp8 plain and scaled (fp8.py); inpainting conv_in zero-padding; base metadata kept,
  `lytools.*` provenance added.
* Into one network (all inputs networks; combine.py): exact concatenation of LoRA-family
  modules, or `rank`/`conv_rank` SVD re-factoring of the summed change (QR of the stacked factors
  when all inputs are low rank), with the Frobenius share kept per module.
* Ratios (ratios.py): one per network input, times every `--ratio-for REGEX=R` whose regex
  matches the module name (re.search on the canonical kohya/LyCORIS name).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from lytools.errors import LytoolsError, UsageError
from lytools.io import check_output_path, open_file, removed_on_failure, same_file
from lytools.io.folders import check_folder_output, lone_shard
from lytools.ui import QUIET, Reporter

if TYPE_CHECKING:
    import torch

    from lytools.merge.checkpoint import CheckpointResult
    from lytools.merge.combine import NetworkMergeResult

# imported on first use, so `lytools.merge.options` (CLI plumbing) does not pull in torch
_LAZY = {
    "CheckpointResult": "lytools.merge.checkpoint", "merge_into_checkpoint": "lytools.merge.checkpoint",
    "NetworkMergeResult": "lytools.merge.combine", "merge_networks": "lytools.merge.combine",
    "Ratios": "lytools.merge.ratios", "parse_ratios": "lytools.merge.ratios",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


def run_merge(
    inputs: Sequence[str | Path],
    output: str | Path | None,
    *,
    ratios: Sequence[float] | None = None,
    ratio_for: Sequence[str] = (),
    allow_unmatched: bool = False,
    rank: int | None = None,
    conv_rank: int | None = None,
    save_dtype: torch.dtype | None = None,
    device: str = "auto",
    dry_run: bool = False,
    overwrite: bool = False,
    verify: bool = False,
    dora_mode: str | None = None,
    keep_ema: bool = False,
    strip_metadata: bool = False,
    reporter: Reporter = QUIET,
) -> CheckpointResult | NetworkMergeResult:
    """Merge `inputs` into `output`: a checkpoint first means networks into it, else networks into one."""
    from lytools.merge.checkpoint import merge_into_checkpoint
    from lytools.merge.combine import merge_networks
    from lytools.merge.inputs import NetworkInputs
    from lytools.merge.ratios import Ratios

    paths = [Path(p) for p in inputs]
    if not paths:
        raise LytoolsError("merge: no inputs")
    if output is None and not dry_run:
        raise UsageError("merge: -o OUT is required (or --dry-run)")
    if verify and dry_run:
        raise UsageError("--verify checks a written output; --dry-run writes none")
    if output is not None:  # a dry run checks it too: it says whether the real run would go through
        from lytools.convert.load import peft_config_path  # a peft input's adapter_config.json is part of it

        replaced = next((path for path in paths
                         if any(same_file(part, output) for part in (path, peft_config_path(path)) if part is not None)),
                        None)
        if replaced is not None:  # even with --overwrite: the merge reads it while writing
            raise LytoolsError(f"{output}: the output would replace the input {replaced}; choose another name")
        if (paths[0] / "model_index.json").is_file():  # into a diffusers folder: the output is a folder
            held = next((path for path in paths if _inside(path, Path(output))), None)
            if held is not None:  # --overwrite replaces the whole folder, the input with it
                raise LytoolsError(f"{output}: replacing this folder would delete the input {held}; choose another name")
            check_folder_output(Path(output), overwrite)
        else:
            check_output_path(output, overwrite)
    # the first input is opened once, for its kind and, when it is the checkpoint, for the merge and
    # --verify: a pickled base is unpickled once; so is every pickled network (loaded keeps it, the first
    # input's loaded from this opening)
    loaded = NetworkInputs()
    with open_file(paths[0], keep_ema=keep_ema) as first:
        kinds = [loaded.kind(paths[0], first)]
        loaded.keep_parts = kinds[0] == "checkpoint"  # networks into it: their q/k/v parts may stay apart
        kinds += [loaded.kind(path) for path in paths[1:]]
        empty = [p for p, k in zip(paths, kinds) if k == "empty"]
        if empty:  # neither a checkpoint nor a network ("only the first input may be a checkpoint" before)
            raise LytoolsError(f"{empty[0]}: holds no tensors")
        later_checkpoints = [p.name for p, k in zip(paths[1:], kinds[1:]) if k == "checkpoint"]
        if later_checkpoints:
            raise LytoolsError(f"{later_checkpoints[0]}: only the first input may be a checkpoint (networks follow it)")
        if kinds[0] == "checkpoint":
            problem = lone_shard(paths[0])  # merging into one shard would miss every module of the others
            if problem:
                raise LytoolsError(problem)
            if len(paths) < 2:
                raise LytoolsError(f"{paths[0].name}: a checkpoint alone: give the networks to merge into it")
            if rank is not None or conv_rank is not None:
                raise UsageError("--rank/--conv-rank apply when merging networks into one network, not into a checkpoint")
            result = merge_into_checkpoint(
                paths[0], paths[1:], output, ratios=ratios, ratio_for=ratio_for, allow_unmatched=allow_unmatched,
                save_dtype=save_dtype, device=device, dry_run=dry_run, overwrite=overwrite,
                dora_mode=dora_mode, keep_ema=keep_ema, reporter=reporter, reader=first, loaded=loaded,
                strip_metadata=strip_metadata,
            )
            if dry_run and device != "auto":
                reporter.warn(f"--device {device}: nothing here runs on a device (a dry run computes nothing)")
            if verify and not dry_run:
                from lytools.merge.verify import verify_checkpoint

                with removed_on_failure(result.output):
                    networks = [loaded.load(path, hash_file=False) for path in paths[1:]]
                    result.verification = verify_checkpoint(result, networks, device, base=first)
                    result.verification.raise_on_failure(result.output)
            return result
    if dora_mode is not None:
        raise UsageError("--dora-mode applies when merging into a checkpoint (DoRA needs the base weights)")
    if allow_unmatched:
        raise UsageError("--allow-unmatched applies when merging into a checkpoint (the first input is a network)")
    if keep_ema:
        raise UsageError("--keep-ema applies when merging into a checkpoint (the first input is a network)")
    result = merge_networks(
        paths, output, ratios=ratios, ratio_for=ratio_for, rank=rank, conv_rank=conv_rank,
        save_dtype=save_dtype, device=device, dry_run=dry_run, overwrite=overwrite, reporter=reporter, loaded=loaded,
        strip_metadata=strip_metadata,
    )
    if device != "auto" and (dry_run or (rank is None and not verify)):  # --verify computes on the device
        why = "a dry run computes nothing" if dry_run else "exact concatenation"
        reporter.warn(f"--device {device}: nothing here runs on a device ({why})")
    if verify and not dry_run:
        from lytools.merge.verify import verify_network

        with removed_on_failure(result.output):
            result.verification = verify_network(result, paths, Ratios.build(len(paths), ratios, ratio_for), device,
                                                 loaded=loaded)
            result.verification.raise_on_failure(result.output)
    return result


def _inside(path: Path, folder: Path) -> bool:
    """True when `path` lies somewhere under the existing folder `folder` (links followed)."""
    try:
        return folder.is_dir() and path.exists() and path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


__all__ = [
    "CheckpointResult", "NetworkMergeResult", "Ratios", "merge_into_checkpoint", "merge_networks",
    "parse_ratios", "run_merge",
]
