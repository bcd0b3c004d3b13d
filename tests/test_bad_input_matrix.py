"""The bad-input matrix: every way a user (or a damaged file) can hand `quant`, `eval`, `convert` or `check` bad
input. Each case must exit with the documented code (2 invalid input, 3 save_path not empty, 4 checkpoint fails
its check), print one `msmodelslim: error:` line that names the problem, print no traceback, and leave every
pre-existing file (the model, a previous checkpoint, the working directory) exactly as it was."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import SCHEMES, run_quant, small_calib, write_config
from msmodelslim.cli.__main__ import main

GOOD_STEP = {"type": "linear_quant", "qconfig": SCHEMES["w8a16"], "exclude": ["lm_head"]}


@dataclass
class Ctx:
    tmp: Path
    model: Path  # a private copy of the tiny Llama (cases may damage it)
    previous: Path  # a complete checkpoint written before the case
    work: Path  # the working directory, holding the user's own file
    eval_text: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def config(self, spec: dict | None = None, text: str | None = None, name: str = "c.yaml") -> Path:
        path = self.tmp / name
        if text is None:
            text = yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec if spec is not None else
                                   {"process": [GOOD_STEP]}})
        path.write_text(text)
        return path

    def step_config(self, **step_changes) -> Path:
        return self.config({"process": [{**GOOD_STEP, **step_changes}]})

    def qconfig(self, act: dict | None = None, weight: dict | None = None) -> Path:
        qconfig = {"weight": {**SCHEMES["w8a16"]["weight"], **(weight or {})}}
        if act is not None:
            qconfig["act"] = act
        return self.step_config(qconfig=qconfig)

    def quant(self, *extra: str, config: Path | None = None, save: str | None = None, model: Path | None = None,
              model_type: str = "Llama-2-7B", device: str = "cpu") -> list[str]:
        argv = ["quant", "--model_path", str(model or self.model), "--save_path", save if save is not None else
                str(self.out), "--device", device, "--model_type", model_type]
        if not any(a in extra for a in ("--quant_type", "--config_path")):
            argv += ["--config_path", str(config or self.config())]
        return argv + list(extra)

    def damaged_model(self, damage: Callable[[Path], None]) -> Path:
        copy = self.tmp / "damaged"
        shutil.copytree(self.model, copy)
        damage(copy)
        return copy

    def eval(self, *, model: Path | None = None, quant: Path | None = None, dataset: str | None = None,
             extra: tuple = ()) -> list[str]:
        return ["eval", "--model_path", str(model or self.model), "--quant_path", str(quant or self.previous),
                "--dataset", dataset or str(self.eval_text), "--window", "16", "--max_windows", "2", *extra]

    def damaged_checkpoint(self, damage: Callable[[Path], None]) -> Path:
        copy = self.tmp / "damaged_ckpt"
        shutil.copytree(self.previous, copy)
        damage(copy)
        return copy


def _weights(path: Path) -> Path:
    return next(path.glob("*.safetensors"))


def _edit_tensors(path: Path, edit: Callable[[dict], None]) -> None:
    file = _weights(path)
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def _edit_json(file: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(file.read_text())
    result = edit(data)
    file.write_text(json.dumps(data if result is None else result))


def _nan_weight(t: dict) -> None:
    t["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")


Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
DYN = {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"}

# id -> (builder(ctx) -> argv, expected exit code, needle in the error line). Builders may set ctx.env.
CASES: dict[str, tuple[Callable[[Ctx], list[str]], int, str]] = {
    # ---- the model path and model type
    "model_path_missing": (lambda c: c.quant(model=c.tmp / "nowhere"), 2, "is not a directory"),
    "model_path_is_a_file": (lambda c: c.quant(model=c.eval_text), 2, "is not a directory"),
    "model_path_empty_dir": (lambda c: c.quant(model=c.damaged_model(lambda p: [f.unlink() for f in p.iterdir()])),
                             2, "has no config.json"),
    "model_path_hub_id": (lambda c: c.quant(model=Path("Qwen/Qwen2.5-7B-Instruct")), 2, "is not a directory"),
    "model_type_unknown": (lambda c: c.quant(model_type="Llama-9-7B"), 2, "unknown --model_type"),
    "model_type_wrong_case": (lambda c: c.quant(model_type="llama-2-7b"), 2, "case-sensitive"),
    "model_type_empty": (lambda c: c.quant(model_type=""), 2, "unknown --model_type"),
    "model_type_other_family": (lambda c: c.quant(model_type="Qwen3-8B"), 2, "expects a checkpoint of type qwen3"),
    "config_json_not_json": (lambda c: c.quant(model=c.damaged_model(
        lambda p: (p / "config.json").write_text("{ not json"))), 2, "config.json"),
    "config_json_a_list": (lambda c: c.quant(model=c.damaged_model(
        lambda p: (p / "config.json").write_text("[1, 2]"))), 2, "config.json"),
    "config_json_unknown_model_type": (lambda c: c.quant(model=c.damaged_model(
        lambda p: _edit_json(p / "config.json", lambda d: d.update(model_type="no_such_arch")))), 2, "config.json"),
    "config_json_negative_size": (lambda c: c.quant(model=c.damaged_model(
        lambda p: _edit_json(p / "config.json", lambda d: d.update(hidden_size=-5)))), 2, "hidden size (-5)"),
    "config_json_zero_layers": (lambda c: c.quant(model=c.damaged_model(
        lambda p: _edit_json(p / "config.json", lambda d: d.update(num_hidden_layers=0)))), 2, "num_hidden_layers"),
    "config_json_needs_remote_code": (lambda c: c.quant(model=c.damaged_model(
        lambda p: _edit_json(p / "config.json", lambda d: d.update(
            model_type="custom_arch", auto_map={"AutoConfig": "modeling_x.XConfig"})))), 2, "--trust_remote_code True"),
    "no_safetensors": (lambda c: c.quant(model=c.damaged_model(lambda p: _weights(p).unlink())), 2, "no *.safetensors"),
    "truncated_safetensors": (lambda c: c.quant(model=c.damaged_model(
        lambda p: _weights(p).write_bytes(_weights(p).read_bytes()[:1000]))), 2, "not a readable safetensors"),
    "weight_shape_mismatch": (lambda c: c.quant(model=c.damaged_model(lambda p: _edit_tensors(
        p, lambda t: t.update({Q_PROJ: torch.zeros(8, 8)})))), 2, "has shape [8, 8]"),
    "weight_int_dtype": (lambda c: c.quant(model=c.damaged_model(lambda p: _edit_tensors(
        p, lambda t: t.update({Q_PROJ: t[Q_PROJ].to(torch.int32)})))), 2, "expected a floating-point weight"),
    "weight_missing": (lambda c: c.quant(model=c.damaged_model(lambda p: _edit_tensors(
        p, lambda t: t.pop(Q_PROJ)))), 2, "lacks"),
    "weight_nan": (lambda c: c.quant(model=c.damaged_model(lambda p: _edit_tensors(p, _nan_weight))), 2, "NaN/Inf"),
    "weight_inf_static": (lambda c: c.quant(model=c.damaged_model(lambda p: _edit_tensors(
        p, lambda t: t["model.norm.weight"].__setitem__(0, float("inf")))),
        config=write_config(c.tmp / "s.yaml", SCHEMES["w8a8_static"], dataset=small_calib(c.tmp))), 2, "NaN/Inf"),
    "stray_duplicate_safetensors": (lambda c: c.quant(model=c.damaged_model(
        lambda p: shutil.copy(_weights(p), p / "zz-extra.safetensors"))), 2, "is in both"),
    "index_names_missing_file": (lambda c: c.quant(model=c.damaged_model(lambda p: (
        p / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {Q_PROJ: "model-00009-of-00009.safetensors"}})))), 2, "model-00009-of-00009"),
    "index_malformed": (lambda c: c.quant(model=c.damaged_model(lambda p: (
        p / "model.safetensors.index.json").write_text("{ nope"))), 2, "index"),
    # ---- the choice of recipe
    "quant_type_unknown": (lambda c: c.quant("--quant_type", "w3a9"), 2, "--quant_type 'w3a9' is not valid"),
    "quant_type_not_available": (lambda c: c.quant("--quant_type", "w4a4"), 2, "w4a4"),
    "config_path_missing": (lambda c: c.quant(config=c.tmp / "missing.yaml"), 2, "does not exist"),
    "config_path_directory": (lambda c: c.quant(config=c.tmp), 2, "does not exist or is not a file"),
    "config_malformed_yaml": (lambda c: c.quant(config=c.config(text="spec: {process: [\n")), 2, "malformed YAML"),
    "config_not_utf8": (lambda c: c.quant(config=(c.tmp / "latin.yaml", (c.tmp / "latin.yaml").write_bytes(
        b"apiversion: modelslim_v1 # \xe9\xff\n"))[0]), 2, "not a UTF-8"),
    "config_empty": (lambda c: c.quant(config=c.config(text="")), 2, "top level must be a mapping"),
    "config_a_list": (lambda c: c.quant(config=c.config(text="- 1\n- 2\n")), 2, "top level must be a mapping"),
    "apiversion_missing": (lambda c: c.quant(config=c.config(text="spec: {}\n")), 2, "apiversion None is unknown"),
    "apiversion_unknown": (lambda c: c.quant(config=c.config(text="apiversion: v9\nspec: {}\n")), 2, "'v9' is unknown"),
    "apiversion_sd_on_a_language_model": (lambda c: c.quant(config=c.config(
        text="apiversion: multimodal_sd_modelslim_v1\nspec: {}\n")), 2, "is not a diffusion model"),
    "spec_missing": (lambda c: c.quant(config=c.config(text="apiversion: modelslim_v1\n")), 2, "spec: required"),
    "spec_unknown_key": (lambda c: c.quant(config=c.config({"process": [GOOD_STEP], "procces": []})), 2,
                         "spec.procces: unknown key"),
    "processor_unknown": (lambda c: c.quant(config=c.config({"process": [{"type": "magic_quant"}]})), 2,
                          "unknown processor type 'magic_quant'"),
    "processor_without_type": (lambda c: c.quant(config=c.config({"process": [{"alpha": 1}]})), 2, "missing 'type'"),
    "processor_unknown_field": (lambda c: c.quant(config=c.step_config(includes=["*"])), 2, "unknown key"),
    "qconfig_missing": (lambda c: c.quant(config=c.config({"process": [{"type": "linear_quant"}]})), 2,
                        "qconfig: required"),
    "act_scope_typo": (lambda c: c.quant(config=c.qconfig(act={**DYN, "scope": "per_tokn"})), 2, "'per_tokn'"),
    "weight_dtype_unknown": (lambda c: c.quant(config=c.qconfig(weight={"dtype": "int3"})), 2, "'int3'"),
    "weight_method_unknown": (lambda c: c.quant(config=c.qconfig(weight={"method": "magic"})), 2, "'magic'"),
    "group_size_not_dividing": (lambda c: c.quant(config=c.qconfig(
        weight={"scope": "per_group", "ext": {"group_size": 48}})), 2, "does not divide"),
    "group_size_negative": (lambda c: c.quant(config=c.qconfig(
        weight={"scope": "per_group", "ext": {"group_size": -16}})), 2, "group_size"),
    "group_size_huge": (lambda c: c.quant(config=c.qconfig(
        weight={"scope": "per_group", "ext": {"group_size": 10**30}})), 2, "beyond ±2**53"),
    "unsupported_pair": (lambda c: c.quant(config=c.qconfig(
        act=DYN, weight={"symmetric": False, "scope": "per_group", "ext": {"group_size": 16}})), 2,
        "no deployable kernel"),
    "runner_typo": (lambda c: c.quant(config=c.config({"runner": "layerwise", "process": [GOOD_STEP]})), 2,
                    "'layerwise'"),
    "saver_unknown": (lambda c: c.quant(config=c.config({"process": [GOOD_STEP], "save": [{"type": "gguf"}]})), 2,
                      "spec.save[0]"),
    "two_savers_of_one_type": (lambda c: c.quant(config=c.config({"process": [GOOD_STEP], "save": [
        {"type": "ascendv1_saver"}, {"type": "ascendv1_saver"}]})), 2, "2 savers of type ascendv1_saver"),
    "part_file_size_negative": (lambda c: c.quant(config=c.config({"process": [GOOD_STEP], "save": [
        {"type": "ascendv1_saver", "part_file_size": -1}]})), 2, "part_file_size"),
    "part_file_size_inf": (lambda c: c.quant(config=c.config(text="apiversion: modelslim_v1\nspec:\n  save: "
                                                                  "[{type: ascendv1_saver, part_file_size: .inf}]\n")),
                           2, "not a finite number"),
    "part_file_size_1e308": (lambda c: c.quant(config=c.config({"process": [GOOD_STEP], "save": [
        {"type": "ascendv1_saver", "part_file_size": 1e308}]})), 2, "part_file_size"),
    "part_file_size_text": (lambda c: c.quant(config=c.config({"process": [GOOD_STEP], "save": [
        {"type": "ascendv1_saver", "part_file_size": "big"}]})), 2, "part_file_size"),
    "dataset_missing": (lambda c: c.quant(config=write_config(c.tmp / "d.yaml", SCHEMES["w8a8_static"],
                                                              dataset="no_such_set.jsonl")), 2, "not found"),
    "dataset_empty": (lambda c: c.quant(config=write_config(c.tmp / "d.yaml", SCHEMES["w8a8_static"], dataset=str(
        (c.tmp / "empty.jsonl", (c.tmp / "empty.jsonl").write_text(""))[0]))), 2, "empty.jsonl"),
    "dataset_bad_jsonl": (lambda c: c.quant(config=write_config(c.tmp / "d.yaml", SCHEMES["w8a8_static"], dataset=str(
        (c.tmp / "bad.jsonl", (c.tmp / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n'))[0]))), 2, "bad.jsonl"),
    "dataset_no_text_field": (lambda c: c.quant(config=write_config(c.tmp / "d.yaml", SCHEMES["w8a8_static"],
        dataset=str((c.tmp / "nt.jsonl", (c.tmp / "nt.jsonl").write_text('{"prompt": "x"}\n'))[0]))), 2, "nt.jsonl"),
    "yaml_alias_bomb": (lambda c: c.quant(config=c.config(text="apiversion: modelslim_v1\nspec: {}\n" + "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'x'] * 9)}]\n" for i in range(9)))), 2, "nodes"),
    "yaml_deep_nesting": (lambda c: c.quant(config=c.config(text="apiversion: modelslim_v1\nx: " + "[" * 3000)), 2,
                          "nested more than"),
    "yaml_duplicate_key": (lambda c: c.quant(config=c.config(
        text="apiversion: modelslim_v1\napiversion: modelslim_v1\nspec: {}\n")), 2, "duplicate key"),
    "brace_explosion": (lambda c: c.quant(config=c.step_config(include=["{a,b}" * 26])), 2, "include"),
    "pattern_not_a_string": (lambda c: c.quant(config=c.step_config(include=[5])), 2, "include"),
    "exclude_not_a_list": (lambda c: c.quant(config=c.step_config(exclude="lm_head")), 2, "exclude"),
    "alpha_nan": (lambda c: c.quant(config=c.config(text="apiversion: modelslim_v1\nspec:\n  process:\n"
                                                        "  - {type: smooth_quant, alpha: .nan}\n")), 2, "not a finite"),
    "alpha_above_one": (lambda c: c.quant(config=c.config({"process": [{"type": "smooth_quant", "alpha": 1.5},
                                                                      GOOD_STEP]})), 2, "alpha"),
    "iter_smooth_alpha_negative": (lambda c: c.quant(config=c.config({"process": [{"type": "iter_smooth", "alpha": -1},
                                                                                 GOOD_STEP]})), 2, "alpha"),
    "transform_after_quantization": (lambda c: c.quant(config=c.config({"process": [
        GOOD_STEP, {"type": "iter_smooth"}]})), 2, "must come before quantization"),
    "layer_matched_twice": (lambda c: c.quant(config=c.config({"process": [GOOD_STEP, GOOD_STEP]})), 2,
                            "configured once"),
    "dp_with_histogram": (lambda c: c.quant(device="cpu:0,1", config=write_config(c.tmp / "h.yaml", {
        **SCHEMES["w8a8_static"], "act": {**SCHEMES["w8a8_static"]["act"], "method": "histogram"}}, runner="auto")),
        2, "cannot run under dp_layer_wise"),
    # ---- where the output goes
    "save_path_empty": (lambda c: c.quant("--overwrite", save=""), 2, "names the working directory"),
    "save_path_dot": (lambda c: c.quant("--overwrite", save="."), 2, "names the working directory"),
    "save_path_root": (lambda c: c.quant("--overwrite", save="/"), 2, "the root of the file system"),
    "save_path_parent_of_cwd": (lambda c: c.quant("--overwrite", save=".."), 2, "a parent of the working directory"),
    "save_path_home": (lambda c: c.quant("--overwrite", save="~"), 2, "your home directory"),
    "save_path_is_a_file": (lambda c: c.quant(save=str(c.eval_text)), 2, "is not a directory"),
    "save_path_parent_missing": (lambda c: c.quant(save=str(c.tmp / "a" / "b" / "out")), 2, "does not exist"),
    "save_path_not_empty": (lambda c: c.quant(save=str(c.previous)), 3, "is not empty"),
    "save_path_foreign_with_overwrite": (lambda c: c.quant("--overwrite", save=str(c.work)), 2,
                                         "the working directory"),
    "save_path_other_files_with_overwrite": (lambda c: c.quant("--overwrite", save=str(
        (c.tmp / "docs", (c.tmp / "docs").mkdir(), (c.tmp / "docs" / "a.txt").write_text("mine"))[0])), 2,
        "not an msmodelslim checkpoint"),
    "save_path_inside_model": (lambda c: c.quant(save=str(c.model / "out")), 2, "overlaps --model_path"),
    "save_path_is_model": (lambda c: c.quant("--overwrite", save=str(c.model)), 2, "overlaps --model_path"),
    "spill_dir_missing": (lambda c: (c.env.update(MSMODELSLIM_SPILL_DIR=str(c.tmp / "nope")), c.quant())[1], 2,
                          "MSMODELSLIM_SPILL_DIR"),
    # ---- the device and the environment
    "device_invalid": (lambda c: c.quant(device="gpu7"), 2, "--device 'gpu7' is not valid"),
    "device_index_twice": (lambda c: c.quant(device="cpu:0,0"), 2, "lists an index twice"),
    "device_npu_absent": (lambda c: c.quant(device="npu:0"), 2, "--device npu:0"),
    "log_level_invalid": (lambda c: (c.env.update(MSMODELSLIM_LOG_LEVEL="loud"), c.quant())[1], 2,
                          "MSMODELSLIM_LOG_LEVEL"),
    "activation_budget_nan": (lambda c: (c.env.update(MSMODELSLIM_ACTIVATION_MEMORY_MIB="nan"), c.quant())[1], 2,
                              "MSMODELSLIM_ACTIVATION_MEMORY_MIB"),
    "activation_budget_inf": (lambda c: (c.env.update(MSMODELSLIM_ACTIVATION_MEMORY_MIB="inf"), c.quant())[1], 2,
                              "MSMODELSLIM_ACTIVATION_MEMORY_MIB"),
    "activation_budget_negative": (lambda c: (c.env.update(MSMODELSLIM_ACTIVATION_MEMORY_MIB="-1"), c.quant())[1], 2,
                                   "MSMODELSLIM_ACTIVATION_MEMORY_MIB"),
    "activation_budget_text": (lambda c: (c.env.update(MSMODELSLIM_ACTIVATION_MEMORY_MIB="lots"), c.quant())[1], 2,
                               "MSMODELSLIM_ACTIVATION_MEMORY_MIB"),
    # ---- eval
    "eval_model_hub_id": (lambda c: c.eval(model=Path("meta-llama/Llama-2-7b")), 2, "never downloaded"),
    "eval_quant_path_missing": (lambda c: c.eval(quant=c.tmp / "nowhere"), 2, "is not a local directory"),
    "eval_quant_path_not_a_checkpoint": (lambda c: c.eval(quant=c.work), 2, "quant_model_description.json is missing"),
    "eval_description_not_json": (lambda c: c.eval(quant=c.damaged_checkpoint(
        lambda p: (p / "quant_model_description.json").write_text("{ nope"))), 2, "quant_model_description.json"),
    "eval_description_a_list": (lambda c: c.eval(quant=c.damaged_checkpoint(
        lambda p: (p / "quant_model_description.json").write_text("[]"))), 2, "quant_model_description.json"),
    "eval_description_unknown_tag": (lambda c: c.eval(quant=c.damaged_checkpoint(lambda p: _edit_json(
        p / "quant_model_description.json", lambda d: d.update({Q_PROJ: "W9A9"})))), 2, "'W9A9'"),
    "eval_incomplete_checkpoint": (lambda c: c.eval(quant=c.damaged_checkpoint(lambda p: _edit_json(
        p / ".msmodelslim.json", lambda d: d.update(complete=False)))), 2, "not a complete checkpoint"),
    "eval_dataset_missing": (lambda c: c.eval(dataset="no_such_eval.txt"), 2, "not found"),
    "eval_window_too_small": (lambda c: c.eval(extra=("--window", "1")), 2, "--window must be >= 2"),
    "eval_no_windows": (lambda c: c.eval(extra=("--max_windows", "0")), 2, "--max_windows >= 1"),
    "eval_remote_code_model": (lambda c: c.eval(model=c.damaged_model(
        lambda p: _edit_json(p / "config.json", lambda d: d.update(
            model_type="custom_arch", auto_map={"AutoConfig": "modeling_x.XConfig"})))), 2, "--trust_remote_code True"),
    # ---- convert
    "convert_not_ascendv1": (lambda c: ["convert", "--model_path", str(c.model), "--save_path", str(c.out)], 2,
                             "is not an ascendv1 checkpoint"),
    "convert_save_path_not_empty": (lambda c: ["convert", "--model_path", str(c.previous), "--save_path",
                                               str(c.work)], 2, "the working directory"),
    "convert_into_previous": (lambda c: ["convert", "--model_path", str(c.previous), "--save_path",
                                         str((c.tmp / "full", (c.tmp / "full").mkdir(),
                                              (c.tmp / "full" / "x").write_text("x"))[0])], 3, "is not empty"),
    "convert_part_file_size_nan": (lambda c: ["convert", "--model_path", str(c.previous), "--save_path", str(c.out),
                                              "--part_file_size", "nan"], 2, "--part_file_size"),
    "convert_malformed_description": (lambda c: ["convert", "--model_path", str(c.damaged_checkpoint(
        lambda p: (p / "quant_model_description.json").write_text("{ nope"))), "--save_path", str(c.out)], 2,
        "quant_model_description.json"),
    # ---- check
    "check_missing_path": (lambda c: ["check", str(c.tmp / "nowhere")], 2, "nowhere does not exist"),
    "check_not_a_checkpoint": (lambda c: ["check", str(c.work)], 2, "is neither an ascendv1"),
    "check_garbage_shard": (lambda c: ["check", str(c.damaged_checkpoint(
        lambda p: _weights(p).write_bytes(b"garbage" * 99)))], 4, "not a readable safetensors file"),
    "check_truncated_shard": (lambda c: ["check", str(c.damaged_checkpoint(
        lambda p: _weights(p).write_bytes(_weights(p).read_bytes()[:5000])))], 4, "not a readable safetensors file"),
    "check_nan_scale": (lambda c: ["check", str(c.damaged_checkpoint(lambda p: _edit_tensors(
        p, lambda t: t["model.layers.0.mlp.up_proj.weight_scale"].__setitem__((0, 0), float("nan")))))], 4,
        "holds NaN or Inf"),
    "check_description_not_json": (lambda c: ["check", str(c.damaged_checkpoint(
        lambda p: (p / "quant_model_description.json").write_text("{ nope")))], 2, "quant_model_description.json"),
    "check_incomplete_staging": (lambda c: ["check", str(c.damaged_checkpoint(lambda p: _edit_json(
        p / ".msmodelslim.json", lambda d: d.update(complete=False, pid=1 << 22))))], 4, "not complete"),
}
ARGPARSE_CASES: dict[str, tuple[Callable[[Ctx], list[str]], str]] = {
    "quant_type_and_config_path": (lambda c: c.quant("--quant_type", "w8a8", "--config_path", "x.yaml"),
                                   "not allowed with argument"),
    "neither_quant_type_nor_config_path": (lambda c: c.quant()[:-2], "one of the arguments"),
    "trust_remote_code_yes": (lambda c: c.quant("--trust_remote_code", "yes"), "expected True or False"),
    "missing_save_path": (lambda c: ["quant", "--model_path", str(c.model), "--model_type", "Llama-2-7B",
                                     "--quant_type", "w8a8"], "--save_path"),
    "eval_window_not_a_number": (lambda c: c.eval(extra=("--window", "wide")), "invalid int value"),
    "unknown_command": (lambda c: ["quantise"], "invalid choice"),
}


@pytest.fixture(scope="module")
def previous_checkpoint(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("previous") / "ckpt"
    run_quant(tiny_llama, out, write_config(out.parent / "c.yaml", SCHEMES["w8a8_dynamic"], part_file_size=0))
    return out


@pytest.fixture
def ctx(tiny_llama, previous_checkpoint, tmp_path, monkeypatch) -> Ctx:
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    previous = tmp_path / "previous"
    shutil.copytree(previous_checkpoint, previous)
    work = tmp_path / "home" / "code" / "project"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("the user's own work")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    eval_text = tmp_path / "eval.txt"
    eval_text.write_text("Debian packages are installed with apt and configured in /etc. " * 40)
    return Ctx(tmp_path, model, previous, work, eval_text)


def _state(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and directory under root with its size, mtime and mode: what 'untouched' means."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_size if path.is_file() else 0, st.st_mtime_ns, st.st_mode)
    return out


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, err.getvalue() + out.getvalue()


def _guarded(ctx: Ctx, build) -> tuple[int, str]:
    argv = build(ctx)  # may create the damaged inputs: those exist before the command runs
    for key, value in ctx.env.items():
        os.environ[key] = value
    before = _state(ctx.tmp)
    try:
        code, text = _run(argv)
    finally:
        for key in ctx.env:
            os.environ.pop(key, None)
    after = _state(ctx.tmp)
    changed = sorted(k for k in before if before[k] != after.get(k))
    assert changed == [], f"pre-existing files changed: {changed[:5]}"
    assert "Traceback" not in text, text
    return code, text


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_with_its_code_and_one_line(ctx, case):
    build, expected, needle = CASES[case]
    code, text = _guarded(ctx, build)
    error_lines = [line for line in text.splitlines() if line.startswith("msmodelslim: error:")]
    if expected == 4:  # the checker prints its findings and a count; the exit code says it failed
        assert code == 4 and needle in text, text
        return
    assert code == expected, text
    assert len(error_lines) == 1, text
    assert needle in text, text
    new_entries = [p for p in ctx.tmp.iterdir() if p.name.startswith((".out.", "out"))]
    assert new_entries == [], f"a failed run left {new_entries}"


@pytest.mark.parametrize("case", list(ARGPARSE_CASES))
def test_malformed_command_lines_are_usage_errors(ctx, case):
    build, needle = ARGPARSE_CASES[case]
    code, text = _guarded(ctx, build)
    assert code == 2 and needle in text, text
    assert sum("error:" in line for line in text.splitlines()) == 1, text


def test_the_matrix_is_large_enough():
    assert len(CASES) + len(ARGPARSE_CASES) >= 100
