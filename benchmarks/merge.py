"""Merge benchmark: a rank-32 LoRA covering every kohya SDXL module (LoCon on the 3x3 convs too)
merged into a full-size synthetic SDXL fp16 checkpoint, against the streaming copy floor and
sd-mecha (the streaming peer) merging the same files, in the same run.

    flock /tmp/lytools-heavy.lock python benchmarks/merge.py [--factor 1] [--device cpu[,cuda]] [--workdir /tmp/lytools-bench-merge] [--keep]

Each contender runs in its own child process with the base's page cache dropped first; wall
time and peak anonymous memory (RssAnon) are printed with the ratios. Targets (issue 5): peak
RssAnon under 1.5 GiB, wall time within 1.3x of the copy floor on CPU. The outputs of lytools
and sd-mecha are compared tensor by tensor. With `--device cpu,cuda`, lytools runs once on each
(`--device` of the CLI) and the two outputs are compared as well.

Measured 2026-11-23 on the shared 2-core CPU machine (SDXL fp16 6.46 GiB, LoRA 243 MiB, 1052 modules):
    copy floor 33.5 / 33.8 s, 150 MiB; lytools 39.6 / 43.8 s (1.18x / 1.30x), 650 / 667 MiB;
    sd-mecha 112.3 s, 7.99 GiB; lytools and sd-mecha outputs identical on the 200 changed tensors compared.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import drop_file_cache, human_bytes, measure, stream_copy  # noqa: E402

GIB = 1 << 30


def lytools_merge(base: str, lora: str, out: str, device: str = "cpu") -> int:
    """lytools merge through the library entry point the CLI uses."""
    from lytools.merge import run_merge

    result = run_merge([base, lora], out, overwrite=True, device=device)
    return len(result.plan.touched)


def sd_mecha_merge(base: str, lora: str, out: str) -> int:
    """sd-mecha: kohya LoRA converted to SGM deltas and added to the base, streamed to a file."""
    import torch
    import sd_mecha
    from sd_mecha.extensions.builtin.merge_methods import linear

    model = sd_mecha.model(base, "sdxl-sgm")
    network = sd_mecha.model(lora, "sdxl-kohya_kohya_lora")
    recipe = linear.add_difference(model, sd_mecha.convert(network, model), alpha=1.0)
    sd_mecha.merge(recipe, output=out, merge_dtype=torch.float32, output_dtype=torch.float16, tqdm=_Silent)
    return 0


class _Silent:
    """A tqdm stand-in that prints nothing (progress bars would pollute the figures)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):  # update, close, set_postfix, refresh, ...: all no-ops
        return lambda *args, **kwargs: None


def compare(ours: Path, peer: Path, base: Path, sample: int = 200) -> tuple[int, float]:
    """Return (changed tensors compared, worst relative difference of the change) between two merges."""
    import torch

    from lytools.io import open_file

    worst, count = 0.0, 0
    with open_file(ours) as a, open_file(peer) as b, open_file(base) as c:
        common = [k for k in a.keys() if k in b]
        for name in common:
            before = c.get(name)
            mine = a.get(name)
            if torch.equal(mine, before):
                continue
            change = mine.float() - before.float()
            difference = float((b.get(name).float() - mine.float()).norm() / change.norm())
            worst = max(worst, difference)
            count += 1
            if count >= sample:
                break
    return count, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=int, default=1, help="shrink factor (1 = full size; sd-mecha needs 1)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--workdir", default="/tmp/lytools-bench-merge")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files")
    parser.add_argument("--no-peer", action="store_true", help="skip sd-mecha")
    parser.add_argument("--device", default="cpu", help="lytools' --device; comma-separated to run on each (cpu,cuda)")
    args = parser.parse_args()
    devices = [d.strip() for d in args.device.split(",") if d.strip()]

    import torch

    from lytools.testing import build_checkpoint, build_network

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / f"sdxl-f{args.factor}.safetensors"
    lora = workdir / f"sdxl-f{args.factor}-r{args.rank}.safetensors"
    try:
        if not base.exists():
            start = time.perf_counter()
            build_checkpoint(base, "sdxl", factor=args.factor, dtype=torch.float16, release=True)
            print(f"built {base.name}: {human_bytes(base.stat().st_size)} in {time.perf_counter() - start:.1f} s")
        if not lora.exists():
            build_network(lora, "sdxl", factor=args.factor, rank=args.rank, alpha=args.rank / 2, modules="c3lier",
                          dtype=torch.float16)
            print(f"built {lora.name}: {human_bytes(lora.stat().st_size)} (1052 modules, rank {args.rank})")
        contenders = {"copy floor (lytools.io)": (stream_copy, [str(base)], {})}
        for device in devices:
            label = "lytools merge" if device == devices[0] else f"lytools merge ({device})"
            contenders[label] = (lytools_merge, [str(base), str(lora)], {"device": device})
        if not args.no_peer and args.factor == 1:
            contenders["sd-mecha 1.x merge"] = (sd_mecha_merge, [str(base), str(lora)], {})
        results = {}
        outputs = {}
        for label, (func, inputs, options) in contenders.items():
            target = workdir / f"out-{len(outputs)}-{label.split()[0]}.safetensors"
            target.unlink(missing_ok=True)
            drop_file_cache(base)
            try:
                results[label] = measure(label, func, *inputs, str(target), **options)
            except RuntimeError as exc:
                print(f"{label}: failed: {str(exc).splitlines()[0][:300]}")
                continue
            print(results[label].line(), flush=True)
            outputs[label] = target
        print()
        floor = results.get("copy floor (lytools.io)")
        ours = results.get("lytools merge")
        peer = results.get("sd-mecha 1.x merge")
        print(f"file: SDXL fp16 factor {args.factor}, {human_bytes(base.stat().st_size)}; LoRA rank {args.rank}, "
              f"{human_bytes(lora.stat().st_size)}; lytools on {devices[0]}")
        if floor and ours:
            ratio = ours.seconds / floor.seconds
            print(f"lytools / copy floor: time {ratio:.2f}x (target <= 1.3x: {'met' if ratio <= 1.3 else 'NOT met'})")
            print(f"lytools peak RssAnon {human_bytes(ours.peak_anon)} (target < 1.5 GiB: "
                  f"{'met' if ours.peak_anon < 1.5 * GIB else 'NOT met'})")
        if peer and ours:
            print(f"sd-mecha / lytools: time {peer.seconds / ours.seconds:.2f}x, peak RssAnon "
                  f"{peer.peak_anon / max(ours.peak_anon, 1):.2f}x")
            count, worst = compare(outputs["lytools merge"], outputs["sd-mecha 1.x merge"], base)
            print(f"outputs agree: {count} changed tensors compared, worst relative difference of the change {worst:.2e}")
        for device in devices[1:]:
            label = f"lytools merge ({device})"
            if label in results and ours:
                other = results[label]
                print(f"lytools on {device}: time {other.seconds:.2f} s ({other.seconds / ours.seconds:.2f}x of {devices[0]}), "
                      f"peak RssAnon {human_bytes(other.peak_anon)}")
                count, worst = compare(outputs["lytools merge"], outputs[label], base)
                print(f"{devices[0]} and {device} outputs: {count} changed tensors compared, worst relative difference "
                      f"of the change {worst:.2e}")
    finally:
        for path in workdir.glob("out-*.safetensors"):
            path.unlink()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
