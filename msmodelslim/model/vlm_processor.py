"""The calibration side of the vision-language adapters: the model's processor (tokenizer, image processor, chat
template) loaded from the checkpoint folder, or, where transformers cannot build it whole (its video processor
needs torchvision, the Omni one also an audio feature extractor), the family's processor class built from the
tokenizer and the image processor alone; and the images a calibration sample names."""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from msmodelslim.core.errors import InvalidDatasetError, InvalidModelError


def load_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidDatasetError(f"calibration image {path} cannot be read as an image ({exc}); replace or "
                                  f"remove it") from None


def load_auto_processor(model_path: Path, trust_remote_code: bool):
    """transformers' processor for the folder, built whole (the caller decides what a failure means)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)


def processor_without(model_path: Path, model_type: str, trust_remote_code: bool, absent: tuple[str, ...],
                      required_tokens: tuple[str, ...] = (), config_settings: bool = True):
    """The family's processor class (its own image/video-token expansion and chat template) built from the
    tokenizer and the image processor alone, the parts named in `absent` given as None: only its constructor's
    check of those parts is skipped. `required_tokens`: the special tokens the class reads off the tokenizer (its
    constructor fails without them), refused by name first. `config_settings`: processor_config.json's settings
    that the class takes by name are passed too."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    class_name = processor_class_name(model_path) or PROCESSOR_MAPPING_NAMES.get(model_type)
    base = getattr(transformers, class_name or "", None)
    if base is None:
        raise InvalidModelError(f"{model_path}: no processor class for model_type {model_type!r} in transformers")

    class WithoutParts(base):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name in absent:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"cannot load the tokenizer and image processor from {model_path}: {exc}") from None
    lacking = [n for n in required_tokens if getattr(tokenizer, n, None) is None]
    if lacking:
        raise InvalidModelError(f"{model_path}: the tokenizer does not name the special tokens {', '.join(lacking)} "
                                f"that the {class_name} needs (tokenizer_config.json extra_special_tokens)")
    settings = processor_settings(model_path, base) if config_settings else {}
    return WithoutParts(image_processor=image_processor, tokenizer=tokenizer, **dict.fromkeys(absent),
                        chat_template=chat_template(model_path) or tokenizer.chat_template, **settings)


def processor_class_name(model_path: Path) -> str | None:
    for file in ("processor_config.json", "preprocessor_config.json"):
        try:
            data = json.loads((Path(model_path) / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("processor_class"), str):
            return data["processor_class"]
    return None


def processor_settings(model_path: Path, processor_class: type) -> dict[str, Any]:
    """processor_config.json's settings that `processor_class` takes by name (e.g. InternVL's image_seq_length)."""
    try:
        data = json.loads((Path(model_path) / "processor_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    named = set(inspect.signature(processor_class.__init__).parameters)
    named -= {"self", "chat_template", "image_processor", "tokenizer", "video_processor"}
    return {k: v for k, v in data.items() if k in named}


def chat_template(model_path: Path) -> str | None:
    jinja = Path(model_path) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        data = json.loads((Path(model_path) / "chat_template.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("chat_template") if isinstance(data, dict) else None
