"""I/O floor: streaming copy of a full-size synthetic SDXL fp16 checkpoint with lytools.io,
against safetensors.torch.load_file + save_file, in the same run.

    python benchmarks/io.py [--arch sdxl] [--factor 1] [--workdir /tmp/lytools-bench-io] [--keep]

Prints wall time and peak anonymous memory (RssAnon) of each contender, each in its own child
process, and the ratios. Targets (issue 3): ours under 1 GiB, time within 1.2x of load+save.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import drop_file_cache, human_bytes, load_save_copy, measure, stream_copy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sdxl")
    parser.add_argument("--factor", type=int, default=1, help="shrink factor (1 = full size)")
    parser.add_argument("--workdir", default="/tmp/lytools-bench-io")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each contender")
    args = parser.parse_args()

    from lytools.testing import build_checkpoint
    import torch

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / f"{args.arch}-f{args.factor}.safetensors"
    try:
        if not source.exists():
            start = time.perf_counter()
            build_checkpoint(source, args.arch, factor=args.factor, dtype=torch.float16)
            print(f"built {source.name}: {human_bytes(source.stat().st_size)} in {time.perf_counter() - start:.1f} s")
        size = source.stat().st_size
        results: dict[str, list] = {"lytools streaming copy": [], "safetensors load_file+save_file": []}
        funcs = {"lytools streaming copy": stream_copy, "safetensors load_file+save_file": load_save_copy}
        for repeat in range(args.repeats):
            for label, func in funcs.items():
                target = workdir / "copy.safetensors"
                target.unlink(missing_ok=True)
                drop_file_cache(source)
                result = measure(label, func, str(source), str(target))
                results[label].append(result)
                print(f"  run {repeat + 1}: {result.line()}")
                target.unlink(missing_ok=True)
        ours = min(results["lytools streaming copy"], key=lambda r: r.seconds)
        plain = min(results["safetensors load_file+save_file"], key=lambda r: r.seconds)
        print()
        print(f"file: {args.arch} factor {args.factor}, {human_bytes(size)}, best of {args.repeats}")
        print(ours.line())
        print(plain.line())
        print(f"time ratio ours / load+save: {ours.seconds / plain.seconds:.2f}x   (target <= 1.2x)")
        print(f"peak RssAnon ours: {human_bytes(ours.peak_anon)} (target < 1 GiB); "
              f"load+save: {human_bytes(plain.peak_anon)}  ratio {plain.peak_anon / max(ours.peak_anon, 1):.1f}x less")
        print(f"throughput ours: {size / ours.seconds / 2**20:.0f} MiB/s; load+save: {size / plain.seconds / 2**20:.0f} MiB/s")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
