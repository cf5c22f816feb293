"""Time per merged weight (ΔW rebuilt and applied) for every algorithm at SDXL layer shapes,
lytools against LyCORIS's own rebuild measured in the same run, on CPU and on CUDA when present.

    python -m benchmarks.algos [--repeats 7] [--rank 32] [--ratio 0.7] [--threads N] [--device cpu|cuda|all]

Each row builds one LyCORIS module around an SDXL-sized layer (1280x1280 linear, 640x640x3x3
conv), fills every tensor with random values, then times
  lycoris: the module's rebuild merge (`get_merged_weight`; for LoHa/LoKr the forward path
           `get_weight` + add, since their `get_merged_weight` applies the scale twice),
  lytools: `apply_module` on the tensors LyCORIS saves,
and reports the best of --repeats runs, the ratio lycoris/lytools (> 1: lytools faster) and
the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lytools.algos import NetworkModule, apply_module  # noqa: E402

NAME = "lora_unet_bench"


@dataclass(frozen=True)
class Case:
    label: str
    layer: str  # "linear" | "conv"
    cls_name: str
    kwargs: dict
    forward_path: bool = False  # LoHa/LoKr: time the rebuild (forward) path


def cases(rank: int) -> list[Case]:
    half = {"lora_dim": rank, "alpha": rank / 2}
    table = []
    for layer in ("linear", "conv"):
        table += [
            Case(f"lora {layer}", layer, "LoConModule", half),
            Case(f"lora+dora {layer}", layer, "LoConModule", {**half, "weight_decompose": True}),
            Case(f"loha {layer}", layer, "LohaModule", half, True),
            Case(f"lokr {layer}", layer, "LokrModule", {**half, "factor": 8}, True),
            Case(f"full {layer}", layer, "FullModule", {}),
            Case(f"glora {layer}", layer, "GLoRAModule", half),
            Case(f"diag-oft {layer}", layer, "DiagOFTModule", {"lora_dim": 32, "constraint": 1e-3}),
            Case(f"boft {layer}", layer, "ButterflyOFTModule", {"lora_dim": 10, "constraint": 0}),
            Case(f"ia3 {layer}", layer, "IA3Module", {}),
        ]
    table += [
        Case("lora tucker conv", "conv", "LoConModule", {**half, "use_tucker": True}),
        Case("loha tucker conv", "conv", "LohaModule", {**half, "use_tucker": True}, True),
        Case("lokr tucker conv", "conv", "LokrModule", {**half, "factor": 8, "use_tucker": True}, True),
    ]
    return table


def make_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(1280, 1280) if kind == "linear" else nn.Conv2d(640, 640, 3, padding=1)


def build(case: Case, layer: nn.Module):
    import lycoris.modules as lycoris_modules

    cls = getattr(lycoris_modules, case.cls_name)
    module = cls(NAME, layer, 1.0, bypass_mode=False, **case.kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.02
            if name == "dora_scale":
                param.copy_(param.abs() + 0.1)
            elif case.cls_name == "FullModule":
                param.add_(noise)
            else:
                param.copy_(noise)
    if case.cls_name == "FullModule":
        module.apply_to()  # the module now holds the tuned layer; its saved file is the difference
    return module


def best_seconds(
    contenders: list[Callable[[], torch.Tensor]], repeats: int, device: torch.device
) -> list[tuple[float, torch.Tensor]]:
    """Return (best time, result) per contender, runs interleaved so both see the same machine load.

    Best of N, not the median: the CPU is shared, and other work only ever adds time.
    """
    results = [func() for func in contenders]  # warm-up (and kernel selection)
    best = [float("inf")] * len(contenders)
    for _ in range(repeats):
        for index, func in enumerate(contenders):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            results[index] = func()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[index] = min(best[index], time.perf_counter() - start)
    return list(zip(best, results))


def run_case(case: Case, device: torch.device, repeats: int, ratio: float) -> tuple[float, float, float]:
    layer = make_layer(case.layer)
    weight = layer.weight.detach().clone()
    module = build(case, layer).to(device)
    network = NetworkModule(NAME, {k: v.detach().to(device) for k, v in module.state_dict().items()})
    base = weight.to(device)

    @torch.no_grad()
    def theirs() -> torch.Tensor:
        if case.forward_path:
            change = module.get_weight(module.shape) * module.scalar
            if module.wd:
                return module.apply_weight_decompose(base + change, ratio)
            return base + ratio * change
        return module.get_merged_weight(ratio, base.shape, device)[0]

    def ours() -> torch.Tensor:
        return apply_module(network, base, None, ratio).weight

    layer.to(device)  # LyCORIS reads the base weight from the layer it wraps
    (lycoris_s, reference), (lytools_s, result) = best_seconds([theirs, ours], repeats, device)
    difference = (result.float() - reference.float().reshape(result.shape)).abs().max().item()
    return lytools_s, lycoris_s, difference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.7,
                        help="merge ratio (at 1.0 LyCORIS's full module returns its stored weight without work)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from importlib.metadata import version

    devices = [torch.device("cpu")] if args.device != "cuda" else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(f"torch {torch.__version__}, lycoris-lora {version('lycoris-lora')}, "
          f"{torch.get_num_threads()} CPU threads, rank {args.rank}, ratio {args.ratio}, best of {args.repeats}")
    print("shapes: linear 1280x1280, conv 640x640x3x3; time = one merged weight (ΔW rebuilt and applied)")
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"\n[{name}]")
        print(f"{'algorithm':<20} {'lytools ms':>11} {'lycoris ms':>11} {'lycoris/lytools':>16} {'max |diff|':>11}")
        ratios = []
        for case in cases(args.rank):
            ours_s, theirs_s, difference = run_case(case, device, args.repeats, args.ratio)
            ratios.append(theirs_s / ours_s)
            print(f"{case.label:<20} {ours_s * 1e3:11.2f} {theirs_s * 1e3:11.2f} {theirs_s / ours_s:15.2f}x {difference:11.2e}")
        print(f"{'geometric mean':<20} {'':>11} {'':>11} {statistics.geometric_mean(ratios):15.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
