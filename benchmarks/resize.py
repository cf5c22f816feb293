"""Benchmark: `lytools resize` against the dense route the peers take (kohya's resize tool builds
every ΔW = up @ down and runs a full torch.linalg.svd on it), in the same run.

Input: a full-size SDXL rank-64 LoRA/LoCon covering every kohya module (text encoders 1 and 2, UNet
with the 3x3 convs), fp16, built by lytools.testing (random factors). Two jobs: fixed rank 16, and
sv_fro 0.9 (cap 64, so the rule alone decides).

* lytools: the real CLI in a child process (read, resize every module, hashes, atomic write), wall
  time and peak RSS of the child; its --report gives each module's rank and kept shares.
* dense route: in a child process, ΔW = up @ down in float32 and torch.linalg.svd, then kohya's rank
  rule and factors (U_r Σ_r, V_rᵀ). Running it on all 1052 modules takes too long on a shared CPU, so
  it is TIMED ON A SAMPLE (per distinct ΔW shape, 1-2 modules) and EXTRAPOLATED by shape counts; the
  figure is labelled as such. kohya asks full_matrices=True, which for the wide 3x3 convs builds a
  23040 x 23040 Vh; the sample uses the thin SVD (full_matrices=False), which is cheaper, so the dense
  figure is a lower bound on kohya's cost and the ratio an underestimate.
* agreement: on every sampled module, the dense route's rank and Frobenius/Σσ shares against
  lytools's report.

Run:  flock /tmp/lytools-heavy.lock /work/venv/bin/python benchmarks/resize.py [--keep] [--per-shape 2]
Files go to /tmp/lytools-bench-resize/ and are deleted afterwards (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = Path("/tmp/lytools-bench-resize")
JOBS = {"rank16": ["--rank", "16"], "sv_fro0.9": ["--method", "sv_fro", "--method-param", "0.9", "--rank", "64"]}


def run_child(args: list[str]) -> tuple[float, float, str]:
    """Run a child process; return (wall seconds, peak RSS in MiB, stdout)."""
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"child failed ({process.returncode}): {' '.join(args)}\n{stderr[-2000:]}")
    peak = _peak_from(stderr)
    return wall, peak, stdout


PEAK_MARK = "PEAK_RSS_KIB="


def _peak_from(stderr: str) -> float:
    for line in stderr.splitlines():
        if line.startswith(PEAK_MARK):
            return int(line[len(PEAK_MARK):]) / 1024
    return float("nan")


def wrapped(argv: list[str]) -> list[str]:
    """Return a command that runs `argv` as a grandchild and prints its peak RSS (VmHWM via wait4)."""
    code = (
        "import os,sys,subprocess\n"
        "p=subprocess.Popen(sys.argv[1:])\n"
        "_,status,usage=os.wait4(p.pid,0)\n"
        f"sys.stderr.write('{PEAK_MARK}%d\\n'%usage.ru_maxrss)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    return [sys.executable, "-c", code, *argv]


# -- the dense route (child) ------------------------------------------------------------------------
def kohya_rank(S, method: str, param: float | None, new_rank: int) -> int:
    """kohya's rank rule on the dense spectrum (written out from its definition)."""
    import torch

    if method == "sv_fro":
        squared = S.pow(2)
        cumulative = torch.cumsum(squared, 0) / float(squared.sum())
        index = int(torch.searchsorted(cumulative, param ** 2)) + 1
        rank = max(1, min(index, len(S) - 1)) + 1
    else:
        rank = new_rank
    if float(S[0]) < 1e-6:
        return 1
    return min(rank, new_rank)


def dense_child(network: Path, sample: list[str], out: Path) -> None:
    import torch

    from lytools.io import open_file

    results = {}
    with open_file(network) as reader:
        for name in sample:
            up = reader.get(f"{name}.lora_up.weight")
            down = reader.get(f"{name}.lora_down.weight")
            # each kohya run builds ΔW and runs the SVD; one SVD serves both jobs here, timed once
            # and counted in each job (the two runs would each pay it)
            started = time.perf_counter()
            weight = up.to(torch.float32).reshape(up.shape[0], -1) @ down.to(torch.float32).reshape(down.shape[0], -1)
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            decomposition = time.perf_counter() - started
            for job, method, param, new_rank in (("rank16", "fixed", None, 16), ("sv_fro0.9", "sv_fro", 0.9, 64)):
                started = time.perf_counter()
                rank = kohya_rank(S, method, param, new_rank)
                new_up = (U[:, :rank] @ torch.diag(S[:rank])).contiguous().to(torch.float16)
                new_down = Vh[:rank].contiguous().to(torch.float16)
                seconds = decomposition + time.perf_counter() - started
                fro = float(S[:rank].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
                total = float(S.sum())
                results.setdefault(name, {})[job] = {
                    "seconds": seconds, "rank": rank, "fro_kept": fro, "sum_kept": float(S[:rank].sum()) / total,
                    "shape": list(weight.shape),
                }
                del new_up, new_down
            del weight, U, S, Vh
    out.write_text(json.dumps(results))


# -- the run ----------------------------------------------------------------------------------------
def build_input(path: Path) -> dict[str, tuple[int, ...]]:
    import torch

    from lytools.arch import module_table
    from lytools.testing import build_network, network_plan

    if not path.exists():
        build_network(path, "sdxl", factor=1, rank=64, conv_rank=64, modules="all", dtype=torch.float16)
    table = module_table("sdxl")
    plan = network_plan("sdxl", factor=1, rank=64, conv_rank=64, modules="all")
    return {name: table[kohya].shape for name, kohya in plan.modules.items()}


def choose_sample(shapes: dict[str, tuple[int, ...]], per_shape: int) -> tuple[list[str], dict[tuple, list[str]]]:
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, shape in sorted(shapes.items()):
        groups[(shape[0], math.prod(shape[1:]))].append(name)
    sample = []
    for flat, names in groups.items():
        take = per_shape if len(names) >= 20 else 1
        step = max(1, len(names) // take)
        sample.extend(names[::step][:take])
    return sample, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the files under /tmp/lytools-bench-resize")
    parser.add_argument("--per-shape", type=int, default=2, help="dense modules timed per frequent shape")
    parser.add_argument("--dense-child", nargs=3, metavar=("NETWORK", "SAMPLE_JSON", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dense_child:
        network, sample, out = args.dense_child
        dense_child(Path(network), json.loads(Path(sample).read_text()), Path(out))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        run(args)
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)


def run(args) -> None:
    import torch

    source = WORK / "sdxl-rank64.safetensors"
    started = time.perf_counter()
    shapes = build_input(source)
    print(f"input: {source.name}, {len(shapes)} modules (SDXL te1+te2+UNet incl. 3x3 convs), rank 64, fp16, "
          f"{source.stat().st_size / 2**20:.0f} MiB (built in {time.perf_counter() - started:.1f} s)")
    print(f"machine: {os.cpu_count()} CPUs visible, torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"load average {os.getloadavg()[0]:.1f}")

    lytools = {}
    for job, options in JOBS.items():
        out, report = WORK / f"out-{job}.safetensors", WORK / f"report-{job}.json"
        command = wrapped([sys.executable, "-m", "lytools", "resize", str(source), str(out), *options,
                           "--device", "cpu", "--report", str(report), "--overwrite", "-q"])
        wall, peak, _ = run_child(command)
        modules = {row["module"]: row for row in json.loads(report.read_text())["modules"]}
        lytools[job] = (wall, peak, modules, out.stat().st_size)
        print(f"lytools {job:10s}: {wall:7.2f} s wall (whole CLI run: read, {len(modules)} modules, hashes, write), "
              f"peak RSS {peak:.0f} MiB, output {out.stat().st_size / 2**20:.0f} MiB")

    sample, groups = choose_sample(shapes, args.per_shape)
    sample_file, dense_file = WORK / "sample.json", WORK / "dense.json"
    sample_file.write_text(json.dumps(sample))
    command = wrapped([sys.executable, str(Path(__file__).resolve()), "--dense-child", str(source), str(sample_file), str(dense_file)])
    wall, peak, _ = run_child(command)
    dense = json.loads(dense_file.read_text())
    print(f"dense route: {len(sample)} sampled modules over {len(groups)} distinct shapes timed in {wall:.1f} s "
          f"(child peak RSS {peak:.0f} MiB)")

    for job in JOBS:
        estimate = 0.0
        for flat, names in groups.items():
            timed = [dense[n][job]["seconds"] for n in names if n in dense]
            estimate += sum(timed) / len(timed) * len(names)
        sampled_seconds = sum(dense[n][job]["seconds"] for n in sample)
        lytools_wall, _, modules, _ = lytools[job]
        mismatched = [n for n in sample if modules[n]["rank_rule"] != dense[n][job]["rank"]]
        fro_gap = max(abs(modules[n]["fro_kept"] - dense[n][job]["fro_kept"]) for n in sample)
        sum_gap = max(abs(modules[n]["sum_kept"] - dense[n][job]["sum_kept"]) for n in sample)
        ranks = sorted({modules[n]["rank_out"] for n in modules if modules[n]["rank_out"] is not None})
        print(f"\n[{job}]")
        print(f"  dense route, EXTRAPOLATED from {len(sample)} sampled modules ({sampled_seconds:.1f} s measured; "
              f"ΔW + thin SVD, compute only, no I/O): {estimate:8.1f} s for all {len(shapes)} modules")
        print(f"  lytools, measured, whole CLI run:                                    {lytools_wall:8.2f} s")
        print(f"  speed-up: {estimate / lytools_wall:.0f}x  (target >= 50x)")
        print(f"  agreement on the {len(sample)} sampled modules: rank mismatches {len(mismatched)}"
              f"{' ' + str(mismatched[:3]) if mismatched else ''}; max |Δ fro share| {fro_gap:.2e}; "
              f"max |Δ Σσ share| {sum_gap:.2e}")
        print(f"  ranks written: {ranks[0]}..{ranks[-1]}; mean Frobenius share kept "
              f"{sum(m['fro_kept'] for m in modules.values()) / len(modules):.4f}")


if __name__ == "__main__":
    main()
