"""Batch convert throughput: N synthetic full-size SD1 LoRAs, kohya -> diffusers with --jobs 2,
against a plain file copy of the same files in the same run (target: >= 70% of copy throughput).

    flock /tmp/lytools-heavy.lock /work/venv/bin/python -m benchmarks.convert [--files 200] [--rank 16] [--jobs 2] [--rounds 3] [--warmup 1]

Contenders (each in its own child process, inputs warm in the page cache for all of them, and
`sync` run before each so none pays for the dirty pages another left behind; the order turns by
one each round, so none always runs right after the same other one):
  copy                   shutil.copyfile of every file (kernel copy, no fsync): the issue's baseline
  copy+fsync             the same plus fsync per file (what a durable writer must pay)
  lytools CLI            `lytools convert - --output-dir D --to diffusers --jobs J -q` (interpreter
                         start included): atomic temp + rename per file, no fsync, as cp
  lytools CLI --fsync    the same with --fsync (each output durable before its path is printed),
                         to compare with copy+fsync
  copy+AutoV3            the plain copy plus SHA-256 of each input's data section, in one process:
                         the least a tool must do to record input hashes (FORMATS.md 5.3)
  lytools --strip        the lytools CLI with --strip-metadata: no provenance, so no input is hashed
                         (not the issue's job, which carries the metadata: it shows what the hash costs)
lytools' modules are byte-compiled first (as a pip install does), so no round pays for compiling
them when PYTHONDONTWRITEBYTECODE is set. Throughput = input bytes / wall seconds. Peak memory =
max RSS of the contender's process tree (resource.getrusage of the waited children). Files live
under /tmp/lytools-bench-convert and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, human_bytes

WORK = Path("/tmp/lytools-bench-convert")
COPY_SCRIPT = """
import hashlib, mmap, os, shutil, struct, sys
src, dst, mode = sys.argv[1], sys.argv[2], sys.argv[3]
for name in sorted(os.listdir(src)):
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    if mode == "fsync":
        fd = os.open(os.path.join(dst, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    elif mode == "hash":  # the input's AutoV3: SHA-256 of its data section, read through a map
        with open(os.path.join(src, name), "rb") as handle:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        hashlib.sha256(memoryview(data)[8 + struct.unpack_from("<Q", data)[0]:]).hexdigest()
"""


def build_inputs(folder: Path, files: int, rank: int, distinct: int = 4) -> int:
    """Write `distinct` synthetic SD1 LoRAs (rank, alpha = rank / 2, fp16) and copies up to `files`."""
    sys.path.insert(0, str(REPO))
    from lytools.testing import build_network

    folder.mkdir(parents=True, exist_ok=True)
    originals = []
    for seed in range(distinct):
        path = folder / f"lora_{seed:04d}.safetensors"
        build_network(path, "sd1", factor=1, rank=rank, alpha=rank / 2, seed=seed, overwrite=True,
                      metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)})
        originals.append(path)
    for index in range(distinct, files):
        shutil.copyfile(originals[index % distinct], folder / f"lora_{index:04d}.safetensors")
    return sum(p.stat().st_size for p in folder.iterdir())


def warm(folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def run_child(command: list[str], stdin: str | None = None) -> tuple[float, int, float]:
    """Run a command; return (wall seconds, peak RSS of the largest process of its tree, CPU seconds).

    os.wait4 reports the child's own resource use, which includes the descendants it waited for
    (the --jobs worker processes)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=env)
    if stdin is not None:
        process.stdin.write(stdin)
    process.stdin.close()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    error = process.stderr.read()
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({process.returncode}): {error[-2000:]}")
    return seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def spot_check(src: Path, out: Path, count: int = 3) -> float:
    """Return the largest relative ΔW error of a few converted files against their inputs."""
    sys.path.insert(0, str(REPO))
    import torch

    from lytools.convert import load_network

    worst = 0.0
    for path in sorted(src.iterdir())[:count]:
        before, after = load_network(path), load_network(out / path.name)
        assert set(before.modules) == set(after.modules)
        for name, module in before.modules.items():
            other = after.modules[name]

            def change(m):
                up, down = m["lora_up.weight"].float(), m["lora_down.weight"].float()
                r = down.shape[0]
                alpha = float(m["alpha"]) if "alpha" in m else r
                return up.flatten(1) @ down.flatten(1) * (alpha / r)

            expected = change(module)
            worst = max(worst, float((change(other) - expected).norm() / expected.norm()))
    del torch
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="Times each contender runs (this machine's disk and "
                        "page cache vary a lot from one run to the next).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first: on this VM the round right after "
                        "the inputs are written runs the copy several times slower, which favoured convert.")
    parser.add_argument("--keep", action="store_true", help="Keep the files under /tmp/lytools-bench-convert.")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # build | check, run in a child process
    args = parser.parse_args()
    if args.child:
        # torch is imported only in these children, so the parent stays small and the peak RSS
        # the kernel reports for each contender (which a forked child inherits) is its own
        if args.child[0] == "build":
            print(build_inputs(Path(args.child[1]), args.files, args.rank))
        else:
            print(spot_check(Path(args.child[1]), Path(args.child[2])))
        return
    me = [sys.executable, "-m", "benchmarks.convert", "--files", str(args.files), "--rank", str(args.rank), "--child"]

    src = WORK / "src"
    try:
        shutil.rmtree(WORK, ignore_errors=True)
        started = time.perf_counter()
        total = int(subprocess.run(me + ["build", str(src)], check=True, capture_output=True, text=True, cwd=REPO).stdout.split()[-1])
        print(f"inputs: {args.files} SD1 LoRAs, rank {args.rank}, alpha {args.rank / 2:g}, fp16, "
              f"{human_bytes(total / args.files)} each, {human_bytes(total)} in all (built in {time.perf_counter() - started:.1f} s)")
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "lytools")], check=True, cwd=REPO)
        listing = "\n".join(str(p) for p in sorted(src.iterdir())) + "\n"
        lytools = [sys.executable, "-m", "lytools", "convert", "-", "--output-dir", None, "--to", "diffusers",
                   "--jobs", str(args.jobs), "-q"]
        contenders = (
            ("copy (shutil.copyfile)", [sys.executable, "-c", COPY_SCRIPT, str(src), None, "plain"], None),
            ("copy + fsync per file", [sys.executable, "-c", COPY_SCRIPT, str(src), None, "fsync"], None),
            (f"lytools convert --jobs {args.jobs}", lytools, listing),
            (f"lytools convert --jobs {args.jobs} --fsync", lytools + ["--fsync"], listing),
            ("copy + AutoV3 of each input", [sys.executable, "-c", COPY_SCRIPT, str(src), None, "hash"], None),
            (f"lytools convert --jobs {args.jobs} --strip", lytools + ["--strip-metadata"], listing),
        )
        runs: dict[str, list[tuple[float, int, float]]] = {label: [] for label, _, _ in contenders}
        last_out = None
        worst = None
        for round_index in range(args.warmup + args.rounds):
            timed = round_index >= args.warmup
            # the order turns by one each round, so no contender always follows the same one: on a VM
            # the page cache a contender fills costs more the longer ago the memory was freed
            turn = round_index % len(contenders)
            for label, command, stdin in contenders[turn:] + contenders[:turn]:
                if last_out is not None:  # the previous contender's outputs go before this one starts
                    shutil.rmtree(last_out, ignore_errors=True)
                out = last_out = fresh(WORK / f"out-{round_index}-{len(runs[label])}-{label.split()[0]}")
                command = [str(out) if part is None else part for part in command]
                warm(src)
                os.sync()
                measured = run_child(command, stdin)
                if timed:
                    runs[label].append(measured)
                if worst is None and label == contenders[2][0]:  # spot check of one output set, not timed
                    worst = float(subprocess.run(me + ["check", str(src), str(out)], check=True, capture_output=True,
                                                 text=True, cwd=REPO).stdout.split()[-1])
        labels = [label for label, _, _ in contenders]
        print(f"{args.rounds} timed rounds after {args.warmup} untimed, each contender once per round, in an order that turns each round; the median "
              f"wall time of each, its range, and the median of its per-round ratio to that round's plain copy")
        print(f"{'contender':<34} {'wall s':>8} {'range s':>13} {'MB/s':>9} {'vs copy':>8} {'CPU s':>7} {'peak RSS':>11}")
        copies = [seconds for seconds, _, _ in runs[labels[0]]]
        ratios = {}
        for label in labels:
            walls = [seconds for seconds, _, _ in runs[label]]
            ratios[label] = statistics.median(copy / wall for copy, wall in zip(copies, walls))
            cpu = statistics.median(c for _, _, c in runs[label])
            peak = max(p for _, p, _ in runs[label])
            wall = statistics.median(walls)
            print(f"{label:<34} {wall:8.2f} {min(walls):6.2f}-{max(walls):<6.2f} {total / wall / 1e6:9.1f} "
                  f"{ratios[label]:8.1%} {cpu:7.1f} {human_bytes(peak):>11}")
        per_round = ", ".join(f"{copy / wall:.0%}" for copy, (wall, _, _) in zip(copies, runs[labels[2]]))
        print(f"lytools convert throughput = {ratios[labels[2]]:.1%} of plain copy (median; rounds: {per_round}); "
              f"target >= 70%")
        durable = statistics.median(c[0] / d[0] for c, d in zip(runs[labels[1]], runs[labels[3]]))
        print(f"lytools convert --fsync throughput = {durable:.1%} of copy + fsync (median), "
              f"{ratios[labels[3]]:.1%} of plain copy")
        hashed = statistics.median(h[0] / c[0] for h, c in zip(runs[labels[4]], runs[labels[2]]))
        print(f"lytools convert throughput = {hashed:.1%} of copy + AutoV3 hashing of each input in one process "
              f"(the least any tool must do to record the input hashes FORMATS.md 5.3 asks for; median)")
        print(f"lytools convert --strip-metadata throughput = {ratios[labels[5]]:.1%} of plain copy (median; no "
              f"input is hashed, since no lytools.sources is written: what the hash costs convert)")
        print(f"spot check: largest relative ΔW error of converted files {worst:.2e}")
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
