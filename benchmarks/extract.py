"""extract on full-size synthetic SD1 (fp16) and SDXL pairs, fixed rank 32 linear / 32 conv:
lytools against LyCORIS's extract functions and the exact routes, in the same run.

    flock /tmp/lytools-heavy.lock python benchmarks/extract.py [--arch sd1,sdxl] [--device cpu,cuda] [--sample 1] [--keep]

Each contender runs in its own child process (wall time, peak RssAnon):
- lytools extract, default (randomized range finder where it certifies itself, exact elsewhere);
- lytools extract with every module on the exact spectrum route (float64 Gram eigendecomposition):
  gives each module's optimal rank-32 error, against which lytools' per-module error is compared;
- LyCORIS `lycoris.utils.extract_linear` / `extract_conv` (a full torch.linalg.svd per module) and a
  bare `torch.linalg.svd` + truncation, on the same difference matrices: timed on `--sample` module(s)
  of every distinct shape and extrapolated to all modules by shape counts (labelled "extrapolated").
  LyCORIS's own script additionally loads both models whole; that memory is not part of this figure.
  LyCORIS is skipped (and said so) where it is not installed.
Every contender runs on each device of --device in turn (`cuda`: the GPU, its time synchronised;
the matrices are read on the CPU and moved there, as lytools does).

The pair: lytools.testing base checkpoint, plus a rank-16 LoRA/LoCon on every kohya module and
Gaussian noise on each changed tensor (build_tuned). Files live in /tmp/lytools-bench-extract and
are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import drop_file_cache, human_bytes, measure  # noqa: E402

WORKDIR = Path("/tmp/lytools-bench-extract")
RANK = 32


def build_pair(arch: str, folder: Path, factor: int = 1) -> tuple[Path, Path]:
    """Write base, network and tuned checkpoints (full size, fp16) unless already there."""
    import torch

    from lytools.testing import build_checkpoint, build_network, build_tuned

    components = ("unet", "clip_l") if arch == "sd1" else ("unet", "clip_l", "clip_g")
    base = folder / f"{arch}-base.safetensors"
    tuned = folder / f"{arch}-tuned.safetensors"
    if not tuned.exists():
        start = time.perf_counter()
        build_checkpoint(base, arch, factor=factor, components=components, dtype=torch.float16, overwrite=True)
        network = build_network(folder / f"{arch}-net.safetensors", arch, factor=factor, rank=16, modules="c3lier",
                                dtype=torch.float16, overwrite=True)
        build_tuned(base, tuned, network, noise=2e-3, overwrite=True)
        network.unlink()
        print(f"built {arch} pair: 2 x {human_bytes(base.stat().st_size)} in {time.perf_counter() - start:.0f} s", flush=True)
    return base, tuned


def run_lytools(base: str, tuned: str, out: str, randomized: bool, device: str = "cpu") -> dict:
    """Child: one extraction; returns per-module (name, kind, shape, route, rel_error) and counts."""
    from lytools.extract import ExtractOptions, FactorOptions, RankRule, extract

    options = ExtractOptions(linear=RankRule("fixed", RANK), conv=RankRule("fixed", RANK), overwrite=True,
                             device=device, factor=FactorOptions(randomized=randomized))
    result = extract(base, tuned, out, options)
    return {
        "modules": [(r.name, r.kind, r.shape, r.stored, r.route, r.rel_error) for r in result.records],
        "summary": result.summary.line(),
    }


def _sample_matrices(base: str, tuned: str, per_shape: int):
    """Yield (shape, count, [difference tensors]) for `per_shape` modules of every distinct shape."""
    from lytools.extract.pipeline import _Source, read_module
    from lytools.extract.plan import plan_extraction

    base_source, tuned_source = _Source(Path(base)), _Source(Path(tuned))
    plan = plan_extraction(
        {i.name: tuple(i.shape) for i in base_source.file.infos()}, {i.name: tuple(i.shape) for i in tuned_source.file.infos()},
        base_path=Path(base), tuned_path=Path(tuned),
    )
    groups: dict[tuple, list] = {}
    for module in plan.modules:
        groups.setdefault(module.shape, []).append(module)
    for shape, modules in sorted(groups.items(), key=lambda item: -math.prod(item[0])):
        picked = modules[:per_shape]
        yield shape, len(modules), [
            read_module(tuned_source, m.tuned, m.shape) - read_module(base_source, m.base, m.shape) for m in picked
        ]


def run_peer(base: str, tuned: str, per_shape: int, which: str, device: str = "cpu") -> dict:
    """Child: time LyCORIS's extract functions (or bare torch.linalg.svd) per shape class on `device`."""
    import torch

    def finish() -> None:
        if device != "cpu":
            torch.cuda.synchronize(device)

    estimate = 0.0
    timed = 0
    for shape, count, differences in _sample_matrices(base, tuned, per_shape):
        seconds = []
        for difference in differences:
            start = time.perf_counter()
            if which == "lycoris":
                from lycoris.utils import extract_conv, extract_linear

                if difference.dim() == 4:
                    extract_conv(difference, "fixed", RANK, device)
                else:
                    extract_linear(difference, "fixed", RANK, device)
            else:
                flat = difference.to(device).reshape(difference.shape[0], -1)
                u, s, vh = torch.linalg.svd(flat, full_matrices=False)
                _ = (u[:, :RANK] * s[:RANK]).contiguous(), vh[:RANK].contiguous()
            finish()
            seconds.append(time.perf_counter() - start)
            timed += 1
        estimate += statistics.mean(seconds) * count
    return {"estimate": estimate, "timed": timed}


def report(arch: str, device: str, fast, exact, peers: dict, per_shape: int) -> None:
    exact_errors = {name: error for name, _, _, stored, _, error in exact.result["modules"] if stored == "lora"}
    ratios, routes, worst = [], {}, (None, 0.0)
    for name, kind, shape, stored, route, error in fast.result["modules"]:
        if stored != "lora" or name not in exact_errors:
            continue
        routes[route] = routes.get(route, 0) + 1
        best = exact_errors[name]
        ratio = error / best if best > 0 else 1.0
        ratios.append(ratio)
        if ratio > worst[1]:
            worst = (name, ratio)
    print(f"\n== {arch} on {device}: fixed rank {RANK} linear / {RANK} conv")
    print(fast.line())
    print(exact.line())
    for label, peer in peers.items():
        print(f"{label:<34} {peer.result['estimate']:9.2f} s   (extrapolated from {peer.result['timed']} modules, "
              f"{per_shape} per shape; SVDs only, no model loading)")
    print(f"lytools: {fast.result['summary']}")
    print(f"routes: {routes}")
    if ratios:
        over = sum(r > 1.01 for r in ratios)
        print(f"per-module error / exact rank-{RANK} error: median {statistics.median(ratios):.5f}, "
              f"max {max(ratios):.5f} ({worst[0]}), modules over 1.01: {over} of {len(ratios)}")
    for label, peer in peers.items():
        print(f"speed-up vs {label}: {peer.result['estimate'] / fast.seconds:.1f}x")
    print(f"speed-up vs lytools exact route: {exact.seconds / fast.seconds:.1f}x")


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd1,sdxl", help="comma-separated: sd1, sdxl")
    parser.add_argument("--device", default="cpu", help="comma-separated: cpu, cuda, cuda:N (each contender on each)")
    parser.add_argument("--sample", type=int, default=1, help="peer modules timed per distinct shape")
    parser.add_argument("--workdir", default=str(WORKDIR))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--factor", type=int, default=1, help="shrink factor (1 = full size; >1 for a smoke run)")
    parser.add_argument("--lytools-only", action="store_true", help="time lytools alone (no exact route, no peers)")
    args = parser.parse_args()
    import importlib.util

    import torch

    devices = [d.strip() for d in args.device.split(",") if d.strip()]
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    have_lycoris = importlib.util.find_spec("lycoris") is not None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; devices: "
          + ", ".join(f"{d} ({device_name(d)})" for d in devices), flush=True)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        for arch in args.arch.split(","):
            base, tuned = build_pair(arch, workdir, args.factor)
            out = workdir / f"{arch}-lora.safetensors"
            for device in devices:
                for path in (base, tuned):
                    drop_file_cache(path)
                fast = measure(f"lytools extract ({device})", run_lytools, str(base), str(tuned), str(out), True, device)
                print(fast.line(), flush=True)
                if args.lytools_only:
                    print(f"lytools: {fast.result['summary']}")
                    continue
                exact = measure(f"lytools extract, exact ({device})", run_lytools, str(base), str(tuned), str(out), False,
                                device)
                print(exact.line(), flush=True)
                peers = {}
                for which, label in (("lycoris", "LyCORIS extract_linear/conv"), ("svd", "torch.linalg.svd route")):
                    if which == "lycoris" and not have_lycoris:
                        print(f"{label}: skipped (lycoris-lora is not installed)", flush=True)
                        continue
                    peers[label] = measure(label, run_peer, str(base), str(tuned), args.sample, which, device)
                    print(f"{label} ({device}): {peers[label].result['estimate']:.1f} s extrapolated "
                          f"(sample run {peers[label].seconds:.1f} s, peak RssAnon {human_bytes(peers[label].peak_anon)})",
                          flush=True)
                report(arch, device, fast, exact, peers, args.sample)
            out.unlink(missing_ok=True)
            if not args.keep:
                base.unlink(missing_ok=True)
                tuned.unlink(missing_ok=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
