"""The `--device cuda` paths against the CPU ones: extract, resize, merge (into a checkpoint and into
one network) and every golden LyCORIS algorithm, run on a CUDA device and compared with what the
same call computes on the CPU (and, for the golden files, with what LyCORIS computed).

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
`pytest tests/test_cuda.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lytools.algos import NetworkModule, apply_module, delta, group_keys, load_module
from lytools.cli import main
from lytools.device import resolve_device
from lytools.errors import DeviceError
from lytools.io import open_file
from lytools.testing import build_checkpoint, build_network, build_tuned, select_modules
from tests.shared import read_tensors, shared_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SHARED = shared_dir()
GOLDEN = None if SHARED is None else SHARED / "fixtures" / "golden"
CASES = sorted(GOLDEN.glob("*.safetensors")) if GOLDEN is not None and GOLDEN.is_dir() else []


def run(args: list[str]) -> None:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code in (0, None), f"lytools {args[0]} exited with {exc.code}"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-30))


def module_changes(path: Path) -> dict[str, torch.Tensor]:
    """Every module's ΔW (scale included) of a LoRA/LoCon/full network file, computed on the CPU."""
    changes = {}
    with open_file(path) as handle:
        for name, keys in group_keys(handle.keys()).modules.items():
            module = load_module(handle, name, keys)
            if "diff" in module:
                shape = tuple(module["diff"].shape)
            else:
                down, up = module["lora_down.weight"], module["lora_up.weight"]
                kernel = module["lora_mid.weight"].shape[2:] if "lora_mid.weight" in module else down.shape[2:]
                shape = (up.shape[0], down.shape[1], *kernel)
            changes[name] = delta(module, shape).float()
    return changes


@pytest.fixture(scope="module")
def sd1_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cuda-sd1")
    base = build_checkpoint(folder / "base.safetensors", "sd1", factor=8, components=("unet", "clip_l"))
    network = build_network(folder / "net.safetensors", "sd1", factor=8, rank=4, modules=select_modules("sd1", "c3lier"))
    tuned = build_tuned(base, folder / "tuned.safetensors", network, noise=2e-4, seed=1)
    return folder, base, tuned.path, network


def test_auto_picks_cuda_and_bad_indices_are_one_line_errors():
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(DeviceError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_merge_on_cuda(path: Path):
    tensors = read_tensors(path)
    network = {key.split(".", 2)[2]: value for key, value in tensors.items() if key.startswith("network.")}
    name = next(key.split(".")[1] for key in tensors if key.startswith("network."))
    module = NetworkModule(name, network)
    base, bias = tensors["base.weight"], tensors.get("base.bias")
    on_gpu = apply_module(module, base, bias, 0.7, device="cuda")
    on_cpu = apply_module(module, base, bias, 0.7, device="cpu")
    assert on_gpu.weight.dtype == base.dtype
    torch.testing.assert_close(on_gpu.weight.cpu(), tensors["expected.weight@0.7"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(on_gpu.weight.cpu(), on_cpu.weight, atol=2e-5, rtol=1e-4)
    if on_cpu.bias is not None:
        torch.testing.assert_close(on_gpu.bias.cpu(), on_cpu.bias, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", [["--linear-dim", "8", "--conv-dim", "8"],
                                  ["--mode", "ratio", "--linear-ratio", "0.05", "--max-rank", "16"],
                                  ["--linear-dim", "8", "--conv-dim", "8", "--tucker"]],
                         ids=["fixed", "ratio", "tucker"])
def test_extract_on_cuda_matches_cpu(sd1_pair, tmp_path, mode):
    _, base, tuned, _ = sd1_pair
    outputs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.safetensors"
        run(["extract", base, tuned, out, *mode, "--device", device, "--verify", "-q"])
        outputs[device] = out
    cpu, gpu = module_changes(outputs["cpu"]), module_changes(outputs["cuda"])
    assert set(cpu) == set(gpu) and cpu
    for name in cpu:
        assert relative(gpu[name], cpu[name]) < 1e-3, name
    with open_file(outputs["cpu"]) as a, open_file(outputs["cuda"]) as b:
        assert {k: a.get(k).shape for k in a.keys()} == {k: b.get(k).shape for k in b.keys()}  # same ranks


@pytest.mark.parametrize("mode", [["--rank", "2"], ["--rank", "4", "--method", "sv_fro", "--method-param", "0.9"]],
                         ids=["fixed", "sv_fro"])
def test_resize_on_cuda_matches_cpu(sd1_pair, tmp_path, mode):
    network = sd1_pair[3]
    outputs = {}
    for device in ("cpu", "cuda"):
        outputs[device] = tmp_path / f"{device}.safetensors"
        run(["resize", network, outputs[device], *mode, "--device", device, "--verify", "-q"])
    cpu, gpu = module_changes(outputs["cpu"]), module_changes(outputs["cuda"])
    assert set(cpu) == set(gpu) and cpu
    for name in cpu:
        assert relative(gpu[name], cpu[name]) < 1e-3, name


@pytest.mark.parametrize("save_dtype", [None, "fp16"])
def test_merge_into_checkpoint_on_cuda_matches_cpu(sd1_pair, tmp_path, save_dtype):
    _, base, _, network = sd1_pair
    other = build_network(tmp_path / "loha.safetensors", "sd1", factor=8, rank=4, algo="loha", seed=3)
    outputs = {}
    for device in ("cpu", "cuda"):
        outputs[device] = tmp_path / f"{device}.safetensors"
        extra = ["--save-dtype", save_dtype] if save_dtype else []
        run(["merge", base, network, other, "--ratios", "0.8", "-0.5", "-o", outputs[device], "--device", device,
             "--verify", *extra, "-q"])
    cpu, gpu = read_tensors(outputs["cpu"]), read_tensors(outputs["cuda"])
    assert set(cpu) == set(gpu)
    original = read_tensors(base)
    changed = 0
    for key in cpu:
        assert gpu[key].dtype == cpu[key].dtype
        if torch.equal(cpu[key], original[key]):
            assert torch.equal(gpu[key], cpu[key]), key  # untouched tensors are copied as they are
            continue
        changed += 1
        tolerance = 1e-3 if cpu[key].dtype == torch.float16 else 1e-5
        assert relative(gpu[key].float() - original[key].float(), cpu[key].float() - original[key].float()) < tolerance * 10, key
        torch.testing.assert_close(gpu[key].float(), cpu[key].float(), atol=tolerance, rtol=tolerance)
    assert changed > 0


def test_merge_networks_by_svd_on_cuda_matches_cpu(sd1_pair, tmp_path):
    network = sd1_pair[3]
    other = build_network(tmp_path / "second.safetensors", "sd1", factor=8, rank=4, seed=5,
                          modules=select_modules("sd1", "c3lier"))
    outputs = {}
    for device in ("cpu", "cuda"):
        outputs[device] = tmp_path / f"{device}.safetensors"
        run(["merge", network, other, "--ratios", "1", "0.5", "--rank", "8", "-o", outputs[device], "--device", device,
             "--verify", "-q"])
    cpu, gpu = module_changes(outputs["cpu"]), module_changes(outputs["cuda"])
    assert set(cpu) == set(gpu) and cpu
    for name in cpu:
        assert relative(gpu[name], cpu[name]) < 1e-3, name
