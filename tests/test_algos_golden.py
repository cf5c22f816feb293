"""Every golden file made by the real LyCORIS reproduces its expected merged weight and bias."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lytools.algos import NetworkModule, apply_module, describe_header, describe_module, group_keys, load_module
from lytools.io import open_file
from tests.shared import shared_dir

SHARED = shared_dir()
GOLDEN = None if SHARED is None else SHARED / "fixtures" / "golden"
CASES = sorted(GOLDEN.glob("*.safetensors")) if GOLDEN is not None and GOLDEN.is_dir() else []
# what each golden file's name says its module is (the suffix of the name is the case)
EXPECTED_ALGO = {"locon": "lora", "diag-oft": "oft", "norms": "norm"}


def test_golden_folder_present():
    if SHARED is None:
        pytest.skip("no shared fixtures: LYTOOLS_SHARED is unset and ../shared is missing")
    assert GOLDEN is not None and GOLDEN.is_dir(), f"golden folder missing: {GOLDEN}"
    assert len(CASES) >= 45, f"expected the 45 golden files in {GOLDEN}, found {len(CASES)}"


def load_case(path: Path) -> tuple[NetworkModule, dict[str, torch.Tensor]]:
    tensors = load_file(str(path))
    network = {key.split(".", 2)[2]: value for key, value in tensors.items() if key.startswith("network.")}
    names = {key.split(".")[1] for key in tensors if key.startswith("network.")}
    assert len(names) == 1
    return NetworkModule(names.pop(), network), tensors


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
@pytest.mark.parametrize("ratio", [1.0, 0.7])
def test_golden_merge(path: Path, ratio: float):
    module, tensors = load_case(path)
    merged = apply_module(module, tensors["base.weight"], tensors.get("base.bias"), ratio)
    torch.testing.assert_close(merged.weight, tensors[f"expected.weight@{ratio}"], atol=2e-5, rtol=1e-4)
    if f"expected.bias@{ratio}" in tensors:
        torch.testing.assert_close(merged.bias, tensors[f"expected.bias@{ratio}"], atol=2e-5, rtol=1e-4)
    elif "base.bias" in tensors:
        assert torch.equal(merged.bias, tensors["base.bias"])
    else:
        assert merged.bias is None
    assert merged.weight.dtype == tensors["base.weight"].dtype


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_float64_is_closer(path: Path):
    module, tensors = load_case(path)
    merged = apply_module(module, tensors["base.weight"].double(), None, 0.7, precision="float64")
    assert merged.weight.dtype == torch.float64
    error = (merged.weight - tensors["expected.weight@0.7"].double()).abs().max().item()
    assert error < 3e-6


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_detection_header_only(path: Path):
    module, tensors = load_case(path)
    with safe_open(str(path), "pt") as handle:
        pairs = {
            key.split(".", 2)[2]: (handle.get_slice(key).get_shape(), handle.get_slice(key).get_dtype())
            for key in handle.keys() if key.startswith("network.")
        }
    alpha = float(module["alpha"].flatten()[0]) if "alpha" in module else None
    on_input = bool(module["on_input"]) if "on_input" in module else None
    from_pairs = describe_header(module.name, pairs, alpha=alpha, on_input=on_input)
    assert from_pairs == describe_module(module)
    family = path.stem.split("-")[0] if not path.stem.startswith("diag-oft") else "diag-oft"
    assert from_pairs.algo == EXPECTED_ALGO.get(family, family)
    assert (from_pairs.dora is not None) == ("dora" in path.stem)
    assert from_pairs.tucker == ("tucker" in path.stem)
    # the same through lytools.io: TensorInfo records, then the module's tensors
    with open_file(path) as source:
        groups = group_keys(key.removeprefix("network.") for key in source.keys())
        assert set(groups.modules) == {module.name}
        keys = {suffix: "network." + key for suffix, key in groups.modules[module.name].items()}
        from_infos = describe_header(module.name, {s: source.info(k) for s, k in keys.items()},
                                     alpha=alpha, on_input=on_input)
        loaded = load_module(source, module.name, keys)  # views the file's map: use it while open
        assert all(torch.equal(loaded[s], module[s]) for s in module)
    assert from_infos == from_pairs
