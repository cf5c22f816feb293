"""`lytools info` over many full-size files, header-only: time per file against the bare header read.

    python benchmarks/info.py [--files 1000] [--workdir /tmp/lytools-bench-info] [--keep]

Builds `--files` sparse full-size files (real headers, data never written: no disk space), a
mix of released checkpoints (SDXL 6.9 GB, Flux-dev 23.8 GB, SD3 medium, SD1, SD2) and full-size
networks (SDXL LoCon rank 32, Flux LoRA rank 16, SD1 LoHa), then times in the same run:
- lytools.info.inspect_file on each file (library, one process);
- `python -m lytools info - --json` over all files (the CLI, process start included);
- the floor: safetensors.safe_open(path).keys() + metadata() (header parse only).
Each contender runs in its own child process; peak anonymous memory (RssAnon) is reported.
Target (issue 3): well under a second per file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import human_bytes, measure  # noqa: E402

KINDS = (
    ("sdxl-checkpoint", "checkpoint", "sdxl", {"release": True}),
    ("flux-dev", "checkpoint", "flux", {"release": True}),
    ("sd3-medium", "checkpoint", "sd3", {}),
    ("sd1-checkpoint", "checkpoint", "sd1", {}),
    ("sd2-checkpoint", "checkpoint", "sd2", {}),
    ("sdxl-locon-r32", "network", "sdxl", {"modules": "c3lier", "rank": 32, "conv_rank": 16}),
    ("flux-lora-r16", "network", "flux", {"rank": 16}),
    ("sd1-loha-r8", "network", "sd1", {"algo": "loha", "rank": 8}),
)


def build_files(workdir: Path, count: int) -> list[tuple[str, Path]]:
    """Write `count` sparse full-size files, cycling through KINDS; return (kind, path)."""
    from lytools.testing import checkpoint_plan, network_plan, write_sparse

    plans = {}
    for label, kind, arch, options in KINDS:
        if kind == "checkpoint":
            plans[label] = [entry for entry, _ in checkpoint_plan(arch, factor=1, **options)]
        else:
            plans[label] = network_plan(arch, factor=1, **options).entries
    metadata = {"ss_network_module": "networks.lora", "modelspec.architecture": "synthetic"}
    files = []
    for index in range(count):
        label = KINDS[index % len(KINDS)][0]
        path = workdir / f"{index:05d}-{label}.safetensors"
        write_sparse(path, plans[label], metadata, overwrite=True)
        files.append((label, path))
    return files


def inspect_all(paths: list[str]) -> dict[str, list[float]]:
    from lytools.info import inspect_file

    times: dict[str, list[float]] = {}
    for path in paths:
        start = time.perf_counter()
        report = inspect_file(path)
        elapsed = time.perf_counter() - start
        label = Path(path).stem.split("-", 1)[1]
        times.setdefault(label, []).append(elapsed)
        if report["architecture"] == "unknown":
            raise RuntimeError(f"{path}: detected as unknown")
    return times


def header_floor(paths: list[str]) -> float:
    import safetensors

    start = time.perf_counter()
    for path in paths:
        with safetensors.safe_open(path, framework="pt") as handle:
            handle.keys()
            handle.metadata()
    return time.perf_counter() - start


def cli_all(paths: list[str]) -> tuple[int, int]:
    """Run the CLI over every path; return (reports printed, the CLI process's peak RSS in bytes)."""
    import resource

    process = subprocess.run(
        [sys.executable, "-m", "lytools", "info", "-", "--json"],
        input="\n".join(paths), capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1]),
    )
    if process.returncode != 0:
        raise RuntimeError(process.stderr.strip()[:300])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return len(json.loads(process.stdout)), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--workdir", default="/tmp/lytools-bench-info")
    parser.add_argument("--keep", action="store_true", help="keep the sparse files")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        files = build_files(workdir, args.files)
        apparent = sum(path.stat().st_size for _, path in files)
        on_disk = sum(path.stat().st_blocks * 512 for _, path in files)
        print(f"built {len(files)} sparse files in {time.perf_counter() - start:.1f} s: "
              f"{human_bytes(apparent)} apparent, {human_bytes(on_disk)} on disk")
        paths = [str(path) for _, path in files]

        library = measure("lytools.info.inspect_file", inspect_all, paths)
        floor = measure("safetensors safe_open (floor)", header_floor, paths)
        cli = measure("lytools info - --json (CLI)", cli_all, paths)
        assert cli.result[0] == len(paths)

        print()
        print(f"{'kind':<18}{'files':>6}{'size each':>12}{'median ms':>11}{'max ms':>9}")
        sizes = {label: path.stat().st_size for label, path in files}
        for label, _, _, _ in KINDS:
            times = library.result.get(label, [])
            if times:
                print(f"{label:<18}{len(times):>6}{human_bytes(sizes[label]):>12}"
                      f"{1000 * statistics.median(times):>11.1f}{1000 * max(times):>9.1f}")
        count = len(paths)
        per_file_library = library.seconds / count
        per_file_cli = cli.seconds / count
        per_file_floor = floor.result / count
        print()
        print(library.line())
        print(f"{cli.label:<34} {cli.seconds:9.2f} s   peak RSS of the lytools process {human_bytes(cli.result[1])}"
              " (ru_maxrss: includes mapped header pages)")
        print(floor.line())
        print()
        print(f"per file: library {1000 * per_file_library:.1f} ms, CLI {1000 * per_file_cli:.1f} ms "
              f"(process start included), safe_open header floor {1000 * per_file_floor:.1f} ms; "
              f"library / floor = {per_file_library / per_file_floor:.1f}x")
        verdict = "met" if per_file_cli < 1.0 else "MISSED"
        print(f"target well under 1 s per file: {verdict} ({per_file_cli * 1000:.0f} ms per file through the CLI)")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
