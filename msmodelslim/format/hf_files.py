"""What every output format shares: walking a block's modules (quantized linears vs float tensors), copying
the source model's config/tokenizer files, and writing the processors' extra files."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from msmodelslim.core.logging import get_logger
from msmodelslim.format.edits import OutputEdits
from msmodelslim.ir.quant_linear import QuantLinear

log = get_logger("format")

COPIED_SUFFIXES = (".json", ".py", ".txt", ".jinja", ".model", ".tiktoken")


def _hf_cache_dirs() -> list[Path]:
    """Where Hugging Face downloads keep their blobs (a snapshot's files are links into them)."""
    dirs = [Path("~/.cache/huggingface").expanduser()]
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]).expanduser())
    return [d.resolve() for d in dirs]


def _followable(path: Path, source_dir: Path) -> bool:
    """A symlinked side file is copied only when it resolves inside the model folder or the Hugging Face cache:
    a link elsewhere (e.g. to ~/.ssh or /etc) would otherwise put that file's contents into the output."""
    if not path.is_symlink():
        return True
    target = path.resolve()
    if any(target.is_relative_to(root) for root in (source_dir.resolve(), *_hf_cache_dirs())):
        return True
    log.warning("not copying %s: it is a symlink to %s, outside the model folder and the Hugging Face cache",
                path, target)
    return False


def quantized_and_float_modules(prefix: str, root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(full name, module) for every module under `root` except those inside a QuantLinear."""
    inside: list[str] = []
    for rel, module in root.named_modules():
        if any(rel.startswith(q + ".") for q in inside):
            continue
        if isinstance(module, QuantLinear):
            inside.append(rel)
        yield (f"{prefix}.{rel}" if rel else prefix), module


def own_tensors(name: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A float module's own parameters and persistent buffers, with full names."""
    for pname, param in module.named_parameters(recurse=False):
        yield f"{name}.{pname}", param
    for bname, buf in module.named_buffers(recurse=False):
        if buf is not None and bname not in module._non_persistent_buffers_set:
            yield f"{name}.{bname}", buf


def write_extra_files(out_dir: Path, edits: OutputEdits) -> None:
    for relative, tensors in edits.files.items():
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out_dir / relative))


def copy_model_files(source_dir: Path, out_dir: Path, config_updates: dict | None = None,
                     quantization_config: dict | None = None) -> None:
    """Config, tokenizer and generation files; never weight indices. In config.json the source's
    `quantization_config` is replaced by `quantization_config` (removed when None) and `config_updates` are
    applied (also inside `text_config`, where a multimodal config keeps the LM keys)."""
    for path in sorted(source_dir.iterdir()):
        if not path.is_file() or not path.name.endswith(COPIED_SUFFIXES) or path.name.endswith("index.json"):
            continue
        if (out_dir / path.name).exists() or not _followable(path, source_dir):
            continue
        shutil.copyfile(path, out_dir / path.name)
    config_path = out_dir / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config.pop("quantization_config", None)
        config.update(config_updates or {})
        if isinstance(config.get("text_config"), dict):
            config["text_config"].pop("quantization_config", None)
            config["text_config"].update(config_updates or {})
        if quantization_config is not None:
            config["quantization_config"] = quantization_config
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
