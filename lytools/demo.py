"""The built-in example: a tiny synthetic SD1 base and fine-tune, and every command run on them.

The fine-tune is the base plus a known rank-8 change (and a little noise) on every kohya
LoCon module, so each step can say how close it got: extract should recover the change,
merging the extracted LoRA back should reproduce the fine-tune, resize and convert should
keep what the spec says they keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lytools.errors import LytoolsError
from lytools.ui import Reporter


@dataclass(frozen=True)
class DemoFiles:
    """The files the demo writes in its folder."""

    base: Path
    change: Path
    tuned: Path
    lora: Path
    report: Path
    resized: Path
    merged: Path
    diffusers: Path

    @classmethod
    def in_folder(cls, folder: Path) -> "DemoFiles":
        return cls(
            base=folder / "base-sd1.safetensors",
            change=folder / "true-change-rank8.safetensors",
            tuned=folder / "tuned-sd1.safetensors",
            lora=folder / "extracted-lora.safetensors",
            report=folder / "extract-report.csv",
            resized=folder / "extracted-lora-rank4.safetensors",
            merged=folder / "base-plus-lora.safetensors",
            diffusers=folder / "extracted-lora-diffusers.safetensors",
        )


def _relative_change_error(merged: Path, tuned: Path, base: Path, keys: tuple[str, ...]) -> float:
    """Return ‖merged − tuned‖ / ‖tuned − base‖ over the changed tensors (streamed, float64)."""
    from lytools.io import open_file

    error = 0.0
    change = 0.0
    with open_file(merged) as merged_file, open_file(tuned) as tuned_file, open_file(base) as base_file:
        for key in keys:
            target = tuned_file.get(key).double()
            error += float((merged_file.get(key).double() - target).pow(2).sum())
            change += float((target - base_file.get(key).double()).pow(2).sum())
    return (error / change) ** 0.5 if change else 0.0


def run_demo(folder: Path, invoke: Callable[[list[str]], None], reporter: Reporter, available: set[str]) -> list[str]:
    """Build the example models in `folder`, run every available command on them; return the steps run."""
    from lytools.testing import build_checkpoint, build_network, build_tuned

    folder.mkdir(parents=True, exist_ok=True)
    files = DemoFiles.in_folder(folder)
    reporter.log(f"demo: building a tiny synthetic SD1 checkpoint (real key names, widths / 8) in {folder}")
    build_checkpoint(files.base, "sd1", factor=8, dtype=torch.float16, overwrite=True)
    build_network(files.change, "sd1", factor=8, rank=8, conv_rank=8, modules="c3lier", dtype=torch.float32,
                  overwrite=True)
    tuned = build_tuned(files.base, files.tuned, files.change, noise=1e-4, overwrite=True)
    reporter.log(f"demo: fine-tune = base + a rank-8 change on {len(tuned.changed)} tensors (+ noise 1e-4)")
    steps: list[str] = []

    def step(name: str, args: list[str], explain: str) -> bool:
        if name not in available:
            return False
        reporter.log(f"\n== lytools {name}: {explain}")
        reporter.log("   $ lytools " + " ".join(args))
        invoke(args)
        steps.append(name)
        return True

    step("info", ["info", str(files.base), str(files.tuned)], "what the two checkpoints are")
    if step("extract", ["extract", str(files.base), str(files.tuned), str(files.lora), "--linear-dim", "8",
                        "--conv-dim", "8", "--report", str(files.report), "--overwrite"],
            "a rank-8 LoRA/LoCon from the difference"):
        step("info", ["info", str(files.lora)], "what the extracted network is")
        step("resize", ["resize", str(files.lora), str(files.resized), "--rank", "4", "--overwrite"],
             "the LoRA brought down to rank 4 (no dense ΔW is built)")
        if step("merge", ["merge", str(files.base), str(files.lora), "-o", str(files.merged), "--overwrite"],
                "the extracted LoRA merged back into the base"):
            error = _relative_change_error(files.merged, files.tuned, files.base, tuned.changed)
            reporter.log(f"demo: merged checkpoint vs fine-tune: relative error {error:.4f} of the change "
                         "(fp16 rounding and the noise the rank-8 LoRA cannot hold)")
        step("convert", ["convert", str(files.lora), "--to", "diffusers", "-o", str(files.diffusers), "--overwrite"],
             "the LoRA in diffusers/peft key names")
    if not steps:
        raise LytoolsError("demo: no command is available to run")
    reporter.log(f"\ndemo: done; files are in {folder}")
    return steps
