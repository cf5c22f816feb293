"""--strip-metadata: every command that writes leaves out the training record, lytools' provenance,
hashes and input file names, keeps what loaders read (lora_adapter_metadata; a checkpoint's
format), hashes no input, and writes the same weights; without it nothing changes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from lytools.algos import delta
from lytools.convert import ConvertOptions, convert_file, load_network
from lytools.convert.fast import try_convert
from lytools.io import read_header, write_safetensors
from lytools.io.metadata import stripped
from lytools.testing import build_checkpoint, build_network, build_tuned
from tests.shared import read_tensors
from tests.shared import run_lytools as cli

SECRET = "secret"  # in every input's file name and in its training record: must not reach a stripped output
RECORD = {
    "ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_output_name": "secret-lora",
    "ss_dataset_dirs": json.dumps({"/home/me/secret-photos": {"n_repeats": 10, "img_count": 30}}),
    "ss_tag_frequency": json.dumps({"secret-photos": {"my secret caption": 30}}),
    "ss_sd_model_name": "/home/me/models/secret-base.safetensors", "ss_base_model_version": "sd_v1",
    "sshs_model_hash": "0" * 64, "modelspec.title": "secret", "modelspec.architecture": "stable-diffusion-v1/lora",
    "lytools.sources": json.dumps([{"name": "secret-older.safetensors"}]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("strip")
    base = build_checkpoint(root / "secret-base.safetensors", "sd1", factor=16, dtype=torch.float32,
                            metadata={"format": "pt", "modelspec.title": "secret base", "ss_sd_model_name": SECRET})
    net = build_network(root / "secret-net.safetensors", "sd1", factor=16, rank=4, alpha=2.0, metadata=RECORD)
    other = build_network(root / "secret-other.safetensors", "sd1", factor=16, rank=2, seed=5, metadata=RECORD)
    tuned = build_tuned(base, root / "secret-tuned.safetensors", net).path
    return {"base": base, "net": net, "other": other, "tuned": tuned}


def metadata_of(path: Path) -> dict[str, str]:
    return dict(read_header(path).metadata or {})


def assert_clean(path: Path, allowed: set[str] = frozenset()) -> dict[str, str]:
    """The file's metadata holds only `allowed` keys and names nothing secret; return it."""
    meta = metadata_of(path)
    assert set(meta) <= set(allowed), sorted(meta)
    assert SECRET not in json.dumps(meta), meta
    return meta


def run(capsys, *args) -> None:
    code, _, err = cli(capsys, *args, "-q")
    assert code == 0, err


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """{module: ΔW} as lytools reads the file back (any layout, the scale applied)."""
    net = load_network(path)
    return {name: delta(module, module["lora_up.weight"].shape[:1] + module["lora_down.weight"].shape[1:]).float()
            for name, module in net.modules.items()}


def assert_same_deltas(path: Path, reference: Path) -> None:
    ours, theirs = deltas(path), deltas(reference)
    assert ours and set(ours) == set(theirs)
    for name, change in ours.items():
        torch.testing.assert_close(change, theirs[name], rtol=1e-3, atol=1e-6, msg=name)


def refuse(*names):
    """A stand-in for a hashing function that fails the test when called."""
    def called(*args, **kwargs):
        raise AssertionError(f"{names[0]} hashed an input under --strip-metadata")
    return called


# -- the rule --------------------------------------------------------------------------------------------
def test_rule_keeps_only_what_loaders_read():
    adapter = json.dumps({"unet.r": 4, "unet.lora_alpha": 2, "unet.base_model_name_or_path": "/home/me/secret"})
    meta = {**RECORD, "format": "pt", "lora_adapter_metadata": adapter, "_quantization_metadata": "{}",
            "unet_lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 4, "revision": "x"}), "lytools.command": "x"}
    network = stripped(meta)
    assert set(network) == {"lora_adapter_metadata", "unet_lora_adapter_metadata"}
    assert json.loads(network["lora_adapter_metadata"]) == {"unet.r": 4, "unet.lora_alpha": 2}
    assert json.loads(network["unet_lora_adapter_metadata"]) == {"r": 4, "lora_alpha": 4}
    assert set(stripped(meta, checkpoint=True)) == {"format", "_quantization_metadata", "lora_adapter_metadata",
                                                     "unet_lora_adapter_metadata"}
    clean = json.dumps({"unet.r": 4})
    assert stripped({"lora_adapter_metadata": clean})["lora_adapter_metadata"] == clean  # untouched, byte for byte


# -- extract, resize, merge --------------------------------------------------------------------------------
def test_extract(models, tmp_path, capsys, monkeypatch):
    plain, bare = tmp_path / "plain.safetensors", tmp_path / "bare.safetensors"
    args = ["extract", models["base"], models["tuned"], "--linear-dim", "4", "--conv-dim", "4"]
    run(capsys, *args, plain)
    import lytools.extract.pipeline as pipeline
    monkeypatch.setattr(pipeline, "_start_hashes", refuse("extract"))
    run(capsys, *args, bare, "--strip-metadata")
    assert assert_clean(bare) == {}
    assert {"lytools.sources", "ss_network_dim", "sshs_model_hash"} <= set(metadata_of(plain))  # unchanged without it
    ours, theirs = read_tensors(bare), read_tensors(plain)
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_resize(models, tmp_path, capsys, monkeypatch):
    plain, bare = tmp_path / "plain.safetensors", tmp_path / "bare.safetensors"
    run(capsys, "resize", models["net"], plain, "--rank", "2")
    import lytools.resize.pipeline as pipeline
    monkeypatch.setattr(pipeline, "file_hashes", refuse("resize"))
    run(capsys, "resize", models["net"], bare, "--rank", "2", "--strip-metadata", "--verify")
    assert assert_clean(bare) == {}
    assert "ss_dataset_dirs" in metadata_of(plain) and "lytools.sources" in metadata_of(plain)
    assert_same_deltas(bare, plain)


def test_merge_networks(models, tmp_path, capsys, monkeypatch):
    plain, bare = tmp_path / "plain.safetensors", tmp_path / "bare.safetensors"
    run(capsys, "merge", models["net"], models["other"], "-o", plain, "--ratios", "1", "0.5")
    import lytools.merge.inputs as inputs
    monkeypatch.setattr(inputs, "file_hashes", refuse("merge"))
    run(capsys, "merge", models["net"], models["other"], "-o", bare, "--ratios", "1", "0.5", "--strip-metadata", "--verify")
    assert assert_clean(bare) == {}
    assert "modelspec.merged_from" in metadata_of(plain)
    assert_same_deltas(bare, plain)


def test_merge_into_checkpoint(models, tmp_path, capsys, monkeypatch):
    plain, bare = tmp_path / "plain.safetensors", tmp_path / "bare.safetensors"
    run(capsys, "merge", models["base"], models["net"], "-o", plain)
    import lytools.merge.checkpoint as checkpoint
    import lytools.merge.inputs as inputs
    monkeypatch.setattr(checkpoint, "DataHashThread", refuse("merge (base)"))
    monkeypatch.setattr(inputs, "file_hashes", refuse("merge (network)"))
    run(capsys, "merge", models["base"], models["net"], "-o", bare, "--strip-metadata", "--verify")
    assert assert_clean(bare, {"format"}) == {"format": "pt"}  # transformers refuses model files without it
    assert {"lytools.sources", "lytools.merge", "modelspec.title"} <= set(metadata_of(plain))
    assert read_header(bare).tensors.keys() == read_header(plain).tensors.keys()
    ours, theirs = read_tensors(bare), read_tensors(plain)
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in ours.items())


def test_merge_into_diffusers_folder(models, tmp_path, capsys):
    from tests.test_container_audit import write_diffusers_folder

    folder = write_diffusers_folder(models["base"], tmp_path / "secret-pipe")
    encoder = folder / "text_encoder" / "model.safetensors"
    tensors = read_tensors(encoder)
    write_safetensors(encoder, tensors, {"format": "pt", "ss_sd_model_name": SECRET}, overwrite=True)
    config = {"_name_or_path": f"/home/someone/{SECRET}/text_encoder", "architectures": ["CLIPTextModel"],
              "hidden_size": 768, "nested": {"_name_or_path": "kept: only the top level says where it came from"}}
    (folder / "text_encoder" / "config.json").write_text(json.dumps(config))
    plain, bare = tmp_path / "plain", tmp_path / "bare"
    run(capsys, "merge", folder, models["net"], "-o", plain)
    run(capsys, "merge", folder, models["net"], "-o", bare, "--strip-metadata")
    files = sorted(p.relative_to(bare) for p in bare.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(plain) for p in plain.rglob("*.safetensors")) and len(files) == 3
    for name in files:
        assert assert_clean(bare / name, {"format"}) == {"format": "pt"}, name
        ours, theirs = read_tensors(bare / name), read_tensors(plain / name)
        assert all(torch.equal(tensor, theirs[key]) for key, tensor in ours.items()), name
    assert "lytools.sources" in metadata_of(plain / "unet" / "diffusion_pytorch_model.safetensors")
    assert metadata_of(plain / "text_encoder" / "model.safetensors")["ss_sd_model_name"] == SECRET  # kept without it
    # configs: `_name_or_path` (often a local path) dropped under --strip-metadata, every other file byte for byte
    stripped_config = json.loads((bare / "text_encoder" / "config.json").read_text())
    assert stripped_config == {key: value for key, value in config.items() if key != "_name_or_path"}
    assert json.loads((plain / "text_encoder" / "config.json").read_text()) == config  # kept without it
    others = sorted(p.relative_to(folder) for p in folder.rglob("*.json") if p.name != "config.json" or "text_encoder" not in p.parts)
    copied = [name for name in others if (bare / name).exists()]  # shard indexes are written anew
    assert Path("model_index.json") in copied
    assert all((bare / name).read_bytes() == (folder / name).read_bytes() for name in copied)


# -- convert ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_input_hash(monkeypatch):
    """Fail on any SHA-256 of data handed over at once (how convert hashes an input; the writer's
    running hashes start empty), and on file_hashes."""
    import lytools.convert.run as run_module

    real = hashlib.sha256

    def sha256(data=b"", **kwargs):
        if len(data):
            raise AssertionError("an input was hashed under --strip-metadata")
        return real(**kwargs)

    monkeypatch.setattr(hashlib, "sha256", sha256)
    monkeypatch.setattr(run_module, "file_hashes", refuse("convert"))


@pytest.mark.parametrize("target,fold", [("kohya", None), ("diffusers", None), ("diffusers", False)])
def test_convert(models, tmp_path, target, fold):
    plain, bare = tmp_path / "plain.safetensors", tmp_path / "bare.safetensors"
    options = ConvertOptions(target=target, fold=fold)
    convert_file(models["net"], plain, options)
    convert_file(models["net"], bare, ConvertOptions(target=target, fold=fold, strip_metadata=True))
    kept = {"lora_adapter_metadata"} if target == "diffusers" else set()
    meta = assert_clean(bare, kept)
    assert set(meta) == kept
    if kept:
        assert meta["lora_adapter_metadata"] == metadata_of(plain)["lora_adapter_metadata"]
    assert "lytools.sources" in metadata_of(plain)
    assert read_tensors(bare).keys() == read_tensors(plain).keys()
    assert_same_deltas(bare, models["net"])


def test_convert_hashes_no_input(models, tmp_path, no_input_hash):
    for target, fold in (("kohya", None), ("diffusers", False), ("peft", None)):
        convert_file(models["net"], tmp_path / f"{target}.safetensors",
                     ConvertOptions(target=target, fold=fold, component="unet" if target == "peft" else None,
                                    strip_metadata=True))
    fast = try_convert(models["net"], tmp_path / "fast.safetensors", ConvertOptions(target="diffusers", strip_metadata=True))
    assert fast is not None


def test_convert_peft(models, tmp_path):
    plain, bare = tmp_path / "plain", tmp_path / "bare"
    convert_file(models["net"], plain, ConvertOptions(target="peft", component="unet", fold=False))
    convert_file(models["net"], bare, ConvertOptions(target="peft", component="unet", fold=False, strip_metadata=True))
    assert assert_clean(bare / "adapter_model.safetensors") == {}
    assert "modelspec.architecture" in metadata_of(plain / "adapter_model.safetensors")
    config = (bare / "adapter_config.json").read_text()
    assert config == (plain / "adapter_config.json").read_text() and SECRET not in config  # what peft needs, as is
    assert json.loads(config)["base_model_name_or_path"] is None
    ours, theirs = read_tensors(bare / "adapter_model.safetensors"), read_tensors(plain / "adapter_model.safetensors")
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in ours.items()) and ours.keys() == theirs.keys()


def test_fast_path_and_general_path_agree(models, tmp_path):
    options = ConvertOptions(target="diffusers", strip_metadata=True)
    fast_out, general_out = tmp_path / "fast.safetensors", tmp_path / "general.safetensors"
    assert try_convert(models["net"], fast_out, options) is not None, "the fast path should take a plain LoRA"
    convert_file(models["net"], general_out, options)
    assert fast_out.read_bytes() == general_out.read_bytes()
    assert set(metadata_of(fast_out)) == {"lora_adapter_metadata"}
    plain = tmp_path / "plain.safetensors"  # and the default fast path is untouched
    try_convert(models["net"], plain, ConvertOptions(target="diffusers"))
    assert "lytools.sources" in metadata_of(plain)


def test_cast(models, tmp_path, capsys):
    """A plain dtype cast: a network keeps nothing but its adapter metadata, a checkpoint its format."""
    diffusers_net = tmp_path / "secret-d.safetensors"
    convert_file(models["net"], diffusers_net, ConvertOptions(target="diffusers", fold=False))
    leaked = {**metadata_of(diffusers_net), **RECORD, "format": "pt"}
    adapter = json.loads(leaked["lora_adapter_metadata"])
    leaked["lora_adapter_metadata"] = json.dumps({**adapter, "unet.base_model_name_or_path": "/home/me/secret"})
    write_safetensors(diffusers_net, read_tensors(diffusers_net), leaked, overwrite=True)
    out = tmp_path / "cast"
    run(capsys, "convert", diffusers_net, models["net"], models["base"], "--output-dir", out, "--save-dtype", "fp32",
        "--strip-metadata")
    meta = assert_clean(out / "secret-d.safetensors", {"lora_adapter_metadata"})
    assert json.loads(meta["lora_adapter_metadata"]) == adapter  # the --no-fold scale, without the path
    assert assert_clean(out / "secret-net.safetensors") == {}
    assert assert_clean(out / "secret-base.safetensors", {"format"}) == {"format": "pt"}
    for name in ("secret-d", "secret-net"):
        source = diffusers_net if name == "secret-d" else models["net"]
        assert_same_deltas(out / f"{name}.safetensors", source)


# -- loaders --------------------------------------------------------------------------------------------------
def test_unfolded_diffusers_output_loads_with_its_scale(tmp_path):
    """With --no-fold the scale lives only in lora_adapter_metadata: diffusers applies it from the stripped file."""
    loaders = pytest.importorskip("tests.test_convert_loaders")
    source = build_network(tmp_path / "secret-k.safetensors", "sd1", factor=loaders.FACTOR, rank=4, alpha=1.0,
                           modules=loaders.sample_modules("sd1")[:12], metadata=RECORD)
    out = tmp_path / "d.safetensors"
    convert_file(source, out, ConvertOptions(target="diffusers", fold=False, strip_metadata=True))
    assert set(assert_clean(out, {"lora_adapter_metadata"})) == {"lora_adapter_metadata"}
    pipe = loaders.tiny_pipeline("sd1")
    pipe.load_lora_weights(str(out), adapter_name="x")
    found = loaders.lora_layers(pipe.unet, "x", "unet", "sd1")
    found.update(loaders.lora_layers(pipe.text_encoder, "x", "text_encoder", "sd1"))
    loaders.assert_deltas_match(found, loaders.our_deltas(source))  # alpha 1 / rank 4: a quarter, as in the source


# -- info --------------------------------------------------------------------------------------------------
def test_info_says_what_a_file_shares(models, tmp_path, capsys):
    code, out, err = cli(capsys, "info", models["net"])
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.strip().startswith("shares"))
    assert "dataset folders" in line and "captions" in line and "--strip-metadata" in line
    bare = tmp_path / "bare.safetensors"
    convert_file(models["net"], bare, ConvertOptions(target="kohya", strip_metadata=True))
    code, out, err = cli(capsys, "info", "--json", bare)
    assert code == 0, err
    assert json.loads(out)[0]["metadata"]["revealing"] == []
    assert "shares" not in cli(capsys, "info", bare)[1]
