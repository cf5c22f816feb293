"""Input containers: sharded checkpoints, diffusers folders, pickles, and inputs of the wrong kind.

Every bad input must give one `lytools: error:` line naming the file, exit 1, no traceback, no
internal error and no output left behind; a pickle must never run code.
"""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch

from lytools.arch.manifests import diffusers_names
from lytools.io import open_file, write_safetensors
from lytools.testing import build_checkpoint, build_network, build_tuned
from tests.shared import read_tensors
from tests.shared import run_lytools as cli

TE = "cond_stage_model.transformer."
VAE = "first_stage_model."


def unet_names() -> dict[str, str]:
    """canonical sd1 UNet key -> diffusers UNet key."""
    mapping = {}
    for name, entry in diffusers_names("sd1")["modules"].items():
        if name.startswith("unet."):
            mapping[entry["key"]] = name[len("unet."):] + ".weight"
            if "bias" in entry:
                mapping[entry["bias"]] = name[len("unet."):] + ".bias"
    return mapping


def folder_key(key: str, unet: dict[str, str]) -> str | None:
    """The diffusers-folder name (`<component>.<key>`) of a canonical sd1 key, None when not carried."""
    if key in unet:
        return "unet." + unet[key]
    if key.startswith(TE):
        return "text_encoder." + key[len(TE):]
    if key.startswith(VAE):
        return "vae." + key[len(VAE):]
    return None


def write_diffusers_folder(native, root, *, shard_unet=False, extra_files=True):
    """Write the sd1 single-file checkpoint `native` as a diffusers folder (UNet in diffusers names,
    text encoder in transformers names, VAE keys as stored), the UNet sharded when asked."""
    unet = unet_names()
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}, "vae": {}}
    for key, tensor in read_tensors(native).items():
        name = folder_key(key, unet)
        if name is not None:
            component, _, rest = name.partition(".")
            parts[component][rest] = tensor
    stems = {"unet": "diffusion_pytorch_model", "text_encoder": "model", "vae": "diffusion_pytorch_model"}
    for component, tensors in parts.items():
        folder = root / component
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"_class_name": component}))
        stem = stems[component]
        if component == "unet" and shard_unet:
            names = sorted(tensors)
            shards = {f"{stem}-00001-of-00002.safetensors": names[: len(names) // 2],
                      f"{stem}-00002-of-00002.safetensors": names[len(names) // 2:]}
            weight_map = {}
            for shard, keys in shards.items():
                write_safetensors(folder / shard, {k: tensors[k] for k in keys}, {"format": "pt"})
                weight_map.update(dict.fromkeys(keys, shard))
            (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
        else:
            write_safetensors(folder / f"{stem}.safetensors", tensors, {"format": "pt"})
    if extra_files:
        (root / "tokenizer").mkdir()
        (root / "tokenizer" / "vocab.json").write_text("{}")
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "vae": ["diffusers", "AutoencoderKL"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None]}))
    return root


def shard_file(native, folder, parts=2):
    """Split a single file into `parts` shards plus a `model.safetensors.index.json`; return the index."""
    tensors = read_tensors(native)
    names = list(tensors)
    folder.mkdir()
    weight_map = {}
    for index in range(parts):
        shard = f"model-{index + 1:05d}-of-{parts:05d}.safetensors"
        chunk = names[index::parts]
        write_safetensors(folder / shard, {k: tensors[k] for k in chunk})
        weight_map.update(dict.fromkeys(chunk, shard))
    index_path = folder / "model.safetensors.index.json"
    index_path.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return index_path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("containers")
    base = build_checkpoint(root / "base.safetensors", "sd1", factor=16, dtype=torch.float32)
    net = build_network(root / "net.safetensors", "sd1", factor=16, rank=4)
    dora = build_network(root / "dora.safetensors", "sd1", factor=16, rank=4, dora=True)
    tuned = build_tuned(base, root / "tuned.safetensors", net).path
    folder_base = write_diffusers_folder(base, root / "pipe-base", shard_unet=True)
    folder_tuned = write_diffusers_folder(tuned, root / "pipe-tuned")
    return {"root": root, "base": base, "net": net, "dora": dora, "tuned": tuned, "folder_base": folder_base,
            "folder_tuned": folder_tuned}


def assert_one_line_error(code: int, err: str, name: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("lytools: error: "), err
    assert name in lines[0], err
    assert "Traceback" not in err and "internal error" not in err, err


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.startswith("out"))


# -- diffusers folders and sharded checkpoints as inputs ------------------------------------------------
def test_info_reads_folders_indexes_and_shards(models, tmp_path, capsys):
    index = shard_file(models["base"], tmp_path / "sharded")
    for path, layout in ((models["folder_base"], "diffusers"), (index, "ldm"), (index.parent, "ldm")):
        code, out, err = cli(capsys, "info", "--json", "--hash", path)
        assert code == 0, err
        report = json.loads(out)[0] if out.lstrip().startswith("[") else json.loads(out)
        assert (report["kind"], report["architecture"], report["layout"]) == ("checkpoint", "sd1", layout)
        weights = [p for p in path.rglob("*.safetensors")] if path.is_dir() else list(index.parent.glob("*.safetensors"))
        assert report["file_bytes"] == sum(p.stat().st_size for p in weights)  # the shards, not the index
        assert "sha256" not in report["hashes"]  # no hash of the index file passed off as the model's
    with open_file(models["folder_base"]) as folder:
        assert set(folder.components) == {"unet", "text_encoder", "vae"}  # tokenizer/scheduler: no weights
        assert folder.info("unet.conv_in.weight").name == "unet.conv_in.weight"


def test_extract_mixed_pair_matches_single_files(models, tmp_path, capsys):
    """Single-file BASE with a diffusers-folder TUNED (and folder with folder) give the same network,
    text encoder modules included."""
    outputs = []
    for base, tuned in ((models["base"], models["tuned"]), (models["base"], models["folder_tuned"]),
                        (models["folder_base"], models["folder_tuned"])):
        out = tmp_path / f"x{len(outputs)}.safetensors"
        code, _, err = cli(capsys, "extract", base, tuned, out, "--linear-dim", "4", "--conv-dim", "0", "-q")
        assert code == 0, err
        outputs.append(read_tensors(out))
    assert any(k.startswith("lora_te_") for k in outputs[0]) and any(k.startswith("lora_unet_") for k in outputs[0])
    for other in outputs[1:]:
        assert set(other) == set(outputs[0])
        for key, tensor in outputs[0].items():
            assert torch.equal(other[key], tensor), key


def test_merge_into_diffusers_folder_writes_a_folder(models, tmp_path, capsys):
    single = tmp_path / "merged.safetensors"
    assert cli(capsys, "merge", models["base"], models["net"], "-o", single, "-q")[0] == 0
    out = tmp_path / "merged-pipe"
    code, stdout, err = cli(capsys, "merge", models["folder_base"], models["net"], "-o", out, "--verify", "-q")
    assert code == 0, err
    assert stdout.strip() == str(out)
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                     "text_encoder/model.safetensors", "tokenizer/vocab.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                     "vae/diffusion_pytorch_model.safetensors"]  # the sharded UNet is written as one file
    merged, base = read_tensors(single), read_tensors(models["base"])
    written = read_tensors(out)
    unet = unet_names()
    changed = {"unet": 0, "text_encoder": 0, "vae": 0}
    for key, tensor in merged.items():
        name = folder_key(key, unet)
        if name is None:
            continue
        assert torch.equal(written[name], tensor), name
        changed[name.partition(".")[0]] += not torch.equal(tensor, base[key])
    assert changed["unet"] > 0 and changed["text_encoder"] > 0 and changed["vae"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged-pipe", "merged.safetensors"]
    # an existing folder is refused without --overwrite, replaced with it
    code, _, err = cli(capsys, "merge", models["folder_base"], models["net"], "-o", out, "-q")
    assert_one_line_error(code, err, str(out))
    assert cli(capsys, "merge", models["folder_base"], models["net"], "-o", out, "-q", "--overwrite")[0] == 0
    assert torch.equal(read_tensors(out)["unet.conv_in.weight"], written["unet.conv_in.weight"])
    # a file name for a folder's output is refused before any work
    code, _, err = cli(capsys, "merge", models["folder_base"], models["net"], "-o", tmp_path / "out.safetensors")
    assert_one_line_error(code, err, "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_merge_creates_a_bias_inside_its_component(models, tmp_path, capsys):
    """A full-difference module with diff_b on a bias-less weight creates the bias: in a folder it
    belongs to the component of its weight (it raised 'no tensor named' for the folder)."""
    module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    shape = read_tensors(models["base"])[key].shape
    net = tmp_path / "full.safetensors"
    write_safetensors(net, {f"{module}.diff": torch.full(shape, 0.01), f"{module}.diff_b": torch.full(shape[:1], 0.5)})
    single, folder = tmp_path / "single.safetensors", tmp_path / "pipe"
    assert cli(capsys, "merge", models["base"], net, "-o", single, "-q")[0] == 0
    code, _, err = cli(capsys, "merge", models["folder_base"], net, "-o", folder, "-q")
    assert code == 0, err
    created = unet_names()[key][: -len(".weight")] + ".bias"
    bias = read_tensors(single)[key[: -len(".weight")] + ".bias"]
    assert torch.equal(bias, torch.full(shape[:1], 0.5))
    with open_file(folder / "unet" / "diffusion_pytorch_model.safetensors") as unet:
        assert torch.equal(unet.get(created), bias)


def test_failed_folder_merge_leaves_nothing(models, tmp_path, monkeypatch):
    from lytools.merge import run_merge
    from lytools.merge.checkpoint import _Engine

    def broken(self, group):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(_Engine, "compute", broken)
    with pytest.raises(OSError):
        run_merge([models["folder_base"], models["net"]], tmp_path / "out-pipe", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_convert_casts_folders_and_sharded_checkpoints(models, tmp_path, capsys):
    out = tmp_path / "pipe16"
    code, _, err = cli(capsys, "convert", models["folder_base"], "-o", out, "--save-dtype", "fp16")
    assert code == 0, err
    source = read_tensors(models["folder_base"])
    written = read_tensors(out)
    assert set(written) == set(source)
    assert all(torch.equal(written[k], v.half() if v.is_floating_point() else v) for k, v in source.items())
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (out / "tokenizer" / "vocab.json").is_file()
    index = shard_file(models["base"], tmp_path / "sharded")
    code, _, err = cli(capsys, "convert", index, "-o", tmp_path / "one.safetensors", "--save-dtype", "bf16")
    assert code == 0, err
    assert read_tensors(tmp_path / "one.safetensors").keys() == read_tensors(models["base"]).keys()
    (tmp_path / "batch").mkdir()
    code, _, err = cli(capsys, "convert", models["folder_base"], "--output-dir", tmp_path / "batch", "--save-dtype", "fp16")
    assert code == 0, err
    assert (tmp_path / "batch" / "pipe-base" / "model_index.json").is_file()


def test_merge_through_an_index_matches_the_single_file(models, tmp_path, capsys):
    index = shard_file(models["base"], tmp_path / "sharded", parts=3)
    for source, out in ((models["base"], tmp_path / "a.safetensors"), (index, tmp_path / "b.safetensors"),
                        (index.parent, tmp_path / "c.safetensors")):
        code, _, err = cli(capsys, "merge", source, models["net"], "-o", out, "-q")
        assert code == 0, err
    a, b, c = (read_tensors(tmp_path / f"{x}.safetensors") for x in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_a_lone_shard_is_refused_where_the_whole_model_is_needed(models, tmp_path, capsys):
    """extract and merge into one shard would work on part of the model (extract exited 0 with the
    other shards' modules 'in one file only'); info reads it and says what it is; a cast is fine."""
    index = shard_file(models["base"], tmp_path / "sharded")
    shard = index.parent / "model-00001-of-00002.safetensors"
    out = tmp_path / "out.safetensors"
    for args in (("extract", shard, models["tuned"], out), ("extract", models["base"], shard, out),
                 ("merge", shard, models["net"], "-o", out)):
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, shard.name)
        assert "model.safetensors.index.json" in err and not out.exists()
    code, stdout, err = cli(capsys, "info", "--json", shard)
    assert code == 0 and "one of the 2 shards of model.safetensors.index.json" in stdout
    assert cli(capsys, "convert", shard, "-o", out, "--save-dtype", "fp16")[0] == 0


# -- broken containers --------------------------------------------------------------------------------
def _broken_index(kind: str, models, folder):
    index = shard_file(models["base"], folder)
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    if kind == "weight_map_list":
        data["weight_map"] = list(data["weight_map"])
    elif kind == "shard_outside":
        first = next(iter(data["weight_map"]))
        data["weight_map"][first] = "../elsewhere.safetensors"
    elif kind == "unknown_tensor":
        data["weight_map"]["not.in.any.shard"] = shards[0]
    elif kind == "unlisted_tensor":
        del data["weight_map"][next(iter(data["weight_map"]))]
    elif kind == "missing_shard":
        (folder / shards[1]).unlink()
    elif kind == "truncated_shard":
        raw = (folder / shards[1]).read_bytes()
        (folder / shards[1]).write_bytes(raw[: len(raw) // 2])
    elif kind == "duplicate":
        tensors = read_tensors(folder / shards[1])
        first = next(k for k, v in data["weight_map"].items() if v == shards[0])
        tensors[first] = read_tensors(folder / shards[0])[first]
        write_safetensors(folder / shards[1], tensors, overwrite=True)
    elif kind == "not_json":
        index.write_text("{ not json")
    index.write_text(json.dumps(data)) if kind != "not_json" else None
    return index


@pytest.mark.parametrize("kind", ["weight_map_list", "shard_outside", "unknown_tensor", "unlisted_tensor",
                                  "missing_shard", "truncated_shard", "duplicate", "not_json"])
def test_broken_index_is_one_line_and_no_output(kind, models, tmp_path, capsys):
    index = _broken_index(kind, models, tmp_path / "sharded")
    out = tmp_path / "out.safetensors"
    for args in (("merge", index, models["net"], "-o", out), ("info", index), ("extract", index, models["tuned"], out),
                 ("convert", index, "-o", out, "--save-dtype", "fp16")):
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, "sharded")
        assert not out.exists()
    assert leftovers(tmp_path) == []


def _raw_safetensors(path, header, data: bytes = b"", length: int | None = None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def _bad_inputs(tmp):
    yield "text", tmp / "notes.txt", lambda p: p.write_text("a text file, not a model\n")
    yield "empty", tmp / "empty.safetensors", lambda p: p.write_bytes(b"")
    yield "empty_pickle", tmp / "empty.ckpt", lambda p: p.write_bytes(b"")
    yield "plain_dir", tmp / "some-folder", lambda p: (p.mkdir(), (p / "readme.md").write_text("hi"))
    yield "overlap", tmp / "overlap.safetensors", lambda p: _raw_safetensors(p, {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    yield "out_of_bounds", tmp / "oob.safetensors", lambda p: _raw_safetensors(p, {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    yield "huge_header", tmp / "huge.safetensors", lambda p: _raw_safetensors(p, {}, length=2**62)
    yield "header_past_end", tmp / "past.safetensors", lambda p: _raw_safetensors(p, {}, length=99_000_000)
    yield "broken_model_index", tmp / "pipe", lambda p: (p.mkdir(), (p / "model_index.json").write_text("{oops"))
    yield "variant_only", tmp / "pipe", _variant_only_folder
    yield "index_no_components", tmp / "pipe", lambda p: (p.mkdir(), (p / "model_index.json").write_text("{}"))


def test_peft_folder_is_read_as_its_adapter_file_and_is_no_checkpoint(models, tmp_path, capsys):
    """A peft adapter folder is an input where a file is (its adapter_model.safetensors: info, convert),
    and a one-line error where a checkpoint is needed (extract)."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    write_safetensors(folder / "adapter_model.safetensors", {"w": torch.zeros(2)})
    code, out, err = cli(capsys, "info", folder)
    assert code == 0 and out.splitlines()[0] == str(folder / "adapter_model.safetensors")
    code, out, err = cli(capsys, "convert", folder, "-o", tmp_path / "cast.safetensors", "--save-dtype", "fp16")
    assert code == 0, err
    out = tmp_path / "out"
    for args in (("extract", models["base"], folder, out), ("extract", folder, models["tuned"], out)):
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, folder.name)
        assert "peft adapter folder" in err
        assert not out.exists()


def _variant_only_folder(path):
    (path / "unet").mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    (path / "unet" / "config.json").write_text("{}")
    # one variant alone is read (tests/test_checkpoint_inputs_audit.py); two are ambiguous
    for variant in ("fp16", "bf16"):
        write_safetensors(path / "unet" / f"diffusion_pytorch_model.{variant}.safetensors", {"conv_in.weight": torch.zeros(2, 2)})


BAD = [name for name, _, _ in _bad_inputs(__import__("pathlib").Path("."))]


@pytest.mark.parametrize("kind", BAD)
def test_wrong_inputs_are_one_line_errors(kind, models, tmp_path, capsys):
    _, path, make = next(item for item in _bad_inputs(tmp_path) if item[0] == kind)
    make(path)
    out = tmp_path / "out"  # no suffix: a valid output name for a file and for a folder
    for args in (("info", path), ("merge", path, models["net"], "-o", out), ("merge", models["base"], path, "-o", out),
                 ("extract", models["base"], path, out), ("extract", path, models["tuned"], out),
                 ("convert", path, "-o", out, "--save-dtype", "fp16")):
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, path.name)
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_network_and_checkpoint_swapped(models, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    cases = ((("merge", models["net"], models["base"], "-o", out), "base.safetensors"),
             (("extract", models["net"], models["tuned"], out), "net.safetensors"),
             (("resize", models["base"], out, "--rank", "2"), "base.safetensors"),
             (("convert", models["base"], "--to", "kohya", "-o", out), "base.safetensors"),
             (("merge", models["base"], models["folder_base"], "-o", out), "pipe-base"),
             # it said "no weight for module ... in this checkpoint"
             (("resize", models["dora"], out, "--rank", "2", "-q", "--base", models["net"]), "net.safetensors"))
    for args, named in cases:
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, named)
        assert not out.exists()


def test_a_file_without_tensors(models, tmp_path, capsys):
    """Legal (info reads it, a cast copies it); merge says it is empty ('only the first input may be a
    checkpoint' before), extract refuses it."""
    zero = write_safetensors(tmp_path / "zero.safetensors", {}, {"a": "b"}).path
    out = tmp_path / "out.safetensors"
    for args in (("merge", models["base"], zero, "-o", out), ("merge", zero, models["net"], "-o", out),
                 ("extract", zero, models["tuned"], out)):
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, "zero.safetensors")
        assert not out.exists()
    assert "holds no tensors" in cli(capsys, "merge", models["base"], zero, "-o", out)[2]
    assert "zero.safetensors: holds no tensors" in cli(capsys, "extract", models["base"], zero, out)[2]
    assert cli(capsys, "info", zero)[0] == 0


# -- pickles -------------------------------------------------------------------------------------------
class _Marker:
    """Unpickling this would create the marker file (it must never be unpickled)."""

    def __init__(self, marker, how="system"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "eval":
            return (eval, (f"open({self.marker!r}, 'w').close()",))
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("form", ["zip", "legacy", "raw_protocol2", "raw_eval"])
def test_malicious_pickle_is_refused_and_never_run(form, models, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    path = tmp_path / ("evil.bin" if form.startswith("raw") else "evil.ckpt")
    payload = {"state_dict": {"w": torch.zeros(2)}, "callback": _Marker(marker, "eval" if form == "raw_eval" else "system")}
    if form.startswith("raw"):  # plain pickle.dump: no tensor (its storage global would be refused first)
        payload["state_dict"] = {"w": 1.0}
    if form == "zip":
        torch.save(payload, path)
    elif form == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2 if form == "raw_protocol2" else 0)
    out = tmp_path / "out.safetensors"
    for args in (("info", path), ("merge", path, models["net"], "-o", out), ("merge", models["base"], path, "-o", out),
                 ("extract", models["base"], path, out), ("convert", path, "-o", out, "--save-dtype", "fp16"),
                 ("resize", path, out, "--rank", "2")):
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, path.name)
        # refused by the global it asks for, or (protocol 0) by an opcode the weights-only loader never reads
        assert ("refusing to load" in err and ("system" in err or "eval" in err)) or "weights-only loader cannot read" in err, err
        assert not out.exists()
    assert not marker.exists()


def test_pickled_checkpoint_nesting_shared_tensors_and_extras(models, tmp_path, capsys):
    """state_dict nesting with non-tensor entries beside it, and keys sharing one storage (or a view of
    it): merging changes the touched key only, the others keep the stored values."""
    tensors = read_tensors(models["base"])
    q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    original = tensors[q].clone()
    tensors["extra.alias.weight"] = tensors[q]
    tensors["extra.view"] = tensors[q][:2]
    path = tmp_path / "nested.ckpt"
    torch.save({"state_dict": tensors, "epoch": 3, "global_step": 10, "hyper": {"lr": 1e-4}, "names": ["a"]}, path)
    reference = tmp_path / "reference.safetensors"
    out = tmp_path / "out.safetensors"
    assert cli(capsys, "merge", models["base"], models["net"], "-o", reference, "-q")[0] == 0
    code, _, err = cli(capsys, "merge", path, models["net"], "-o", out, "-q")
    assert code == 0, err
    merged, expected = read_tensors(out), read_tensors(reference)
    assert torch.equal(merged[q], expected[q]) and not torch.equal(merged[q], original)
    assert torch.equal(merged["extra.alias.weight"], original) and torch.equal(merged["extra.view"], original[:2])
    assert all(torch.equal(merged[k], v) for k, v in expected.items())
