"""Runner behaviour: same bytes from both runners, no forward for data-free pipelines, one block in memory."""
import hashlib
import json

import torch
from safetensors import safe_open
from transformers.models.llama import modeling_llama

from helpers import SCHEMES, run_quant, small_calib, write_config
from msmodelslim.format.ascendv1.writer import AscendV1Writer
from msmodelslim.model.transformers_model import TransformersModel

COMPARED = ("quant_model_description.json", "quant_model_weights.safetensors.index.json", "config.json")


def digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())
            if p.suffix == ".safetensors" or p.name in COMPARED}


def test_model_wise_and_layer_wise_write_identical_bytes(tiny_qwen2, tmp_path):
    calib = small_calib(tmp_path)
    outs = {}
    for runner in ("layer_wise", "model_wise"):
        config = write_config(tmp_path / f"{runner}.yaml", SCHEMES["w8a8_static"], runner=runner, dataset=calib)
        outs[runner] = tmp_path / runner
        run_quant(tiny_qwen2, outs[runner], config, "Qwen2-7B")
    layer, model = digest(outs["layer_wise"]), digest(outs["model_wise"])
    assert len(layer) >= 4 and layer == model


def test_released_tied_bf16_tables_are_written_as_model_wise_writes_them(tiny_qwen3_bf16_tied, tmp_path):
    """layer_wise drops the embedding and head during the walk and reads them back to write them; a tied bf16
    table must come out as model_wise (which keeps everything in memory) writes it."""
    outs = {}
    for runner in ("layer_wise", "model_wise"):
        config = write_config(tmp_path / f"{runner}.yaml", SCHEMES["w8a8_dynamic"], runner=runner)
        outs[runner] = tmp_path / runner
        run_quant(tiny_qwen3_bf16_tied, outs[runner], config, "Qwen3-8B")
    assert digest(outs["layer_wise"]) == digest(outs["model_wise"])
    tensors = read_all(outs["layer_wise"])
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert tensors["lm_head.weight"].dtype == torch.bfloat16


def count_block_forwards(monkeypatch):
    calls = {"n": 0}
    original = modeling_llama.LlamaDecoderLayer.forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", counting)
    return calls


def test_data_free_pipeline_runs_no_forward(tiny_llama, tmp_path, monkeypatch):
    calls = count_block_forwards(monkeypatch)
    run_quant(tiny_llama, tmp_path / "w8a16", write_config(tmp_path / "a.yaml", SCHEMES["w8a16"]))
    run_quant(tiny_llama, tmp_path / "dyn", write_config(tmp_path / "b.yaml", SCHEMES["w8a8_dynamic"]))
    assert calls["n"] == 0
    run_quant(tiny_llama, tmp_path / "static",
              write_config(tmp_path / "c.yaml", SCHEMES["w8a8_static"], dataset=small_calib(tmp_path)))
    assert calls["n"] > 0


def test_layer_wise_holds_one_block_at_a_time(tiny_llama, tmp_path, monkeypatch):
    seen = {}
    original_load, original_add = TransformersModel.load_block, AscendV1Writer.add_module_tree

    def load_block(self, model, name, device, as_stored=False):
        seen["model"] = model
        return original_load(self, model, name, device, as_stored)

    def add_module_tree(self, prefix, root):
        if prefix.startswith("model.layers."):
            layers = seen["model"].model.layers
            devices = {i: {t.device.type for t in layer.state_dict().values()} for i, layer in enumerate(layers)}
            current = int(prefix.rsplit(".", 1)[1])
            assert devices[current] == {"cpu"}
            assert all(d == {"meta"} for i, d in devices.items() if i != current), devices
            # the embedding and head are not needed once the batches are embedded: read again when written
            assert seen["model"].model.embed_tokens.weight.is_meta and seen["model"].lm_head.weight.is_meta
        return original_add(self, prefix, root)

    monkeypatch.setattr(TransformersModel, "load_block", load_block)
    monkeypatch.setattr(AscendV1Writer, "add_module_tree", add_module_tree)
    run_quant(tiny_llama, tmp_path / "out",
              write_config(tmp_path / "c.yaml", SCHEMES["w8a8_static"], dataset=small_calib(tmp_path)))


def read_all(path):
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def test_sharding_and_single_file_hold_the_same_tensors(tiny_llama, tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    run_quant(tiny_llama, sharded, write_config(tmp_path / "a.yaml", SCHEMES["w8a16"], part_file_size=0.0001))
    run_quant(tiny_llama, single, write_config(tmp_path / "b.yaml", SCHEMES["w8a16"], part_file_size=0))
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"quant_model_weights-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / "quant_model_weights.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert [p.name for p in single.glob("*.safetensors")] == ["quant_model_weights.safetensors"]
    assert not (single / "quant_model_weights.safetensors.index.json").exists()
    a, b = read_all(sharded), read_all(single)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())


def test_plans_read_no_weight(tiny_llama, tmp_path, monkeypatch):
    """A dry run (even of model_wise) and the launcher of spawned ranks plan on the skeleton: no tensor read."""
    from msmodelslim.core.device import DeviceSpec
    from msmodelslim.model.checkpoint import SafetensorsCheckpoint

    reads = []
    original = SafetensorsCheckpoint.load
    monkeypatch.setattr(SafetensorsCheckpoint, "load", lambda self, names, *a: reads.append(names) or original(self, names, *a))
    calib = small_calib(tmp_path)
    model_wise = write_config(tmp_path / "m.yaml", SCHEMES["w8a8_static"], runner="model_wise", dataset=calib)
    report = run_quant(tiny_llama, tmp_path / "dry", model_wise, dry_run=True)
    assert report.plan and reads == [] and not (tmp_path / "dry").exists()
    auto = write_config(tmp_path / "a.yaml", SCHEMES["w8a8_static"], runner="auto", dataset=calib)
    run_quant(tiny_llama, tmp_path / "dp", auto, device=DeviceSpec("cpu", (0, 1)))
    assert reads == []  # the ranks, separate processes, read for themselves
    assert (tmp_path / "dp" / "quant_model_description.json").is_file()
    run_quant(tiny_llama, tmp_path / "single", auto)
    assert reads  # the patch does see reads made in this process


def test_prefetch_hints_cover_exactly_each_tensors_bytes(tiny_llama):
    """The spans prefetch hands to the kernel are each tensor's bytes in its shard (read back and compared)."""
    from safetensors.torch import load_file

    from msmodelslim.model.checkpoint import SafetensorsCheckpoint

    checkpoint = SafetensorsCheckpoint(tiny_llama)
    tensors = {}
    for shard in tiny_llama.glob("*.safetensors"):
        tensors.update({(shard.name, k): v for k, v in load_file(shard).items()})
    assert len(tensors) == len(checkpoint.names())
    for (file, name), tensor in tensors.items():
        start, end = checkpoint._span_of[name]
        with open(tiny_llama / file, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        assert raw == tensor.contiguous().view(torch.uint8).numpy().tobytes(), name
    checkpoint.prefetch(checkpoint.names() + ["not.a.tensor"])  # a hint only: unknown names are skipped
