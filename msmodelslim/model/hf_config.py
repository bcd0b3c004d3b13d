"""Reading a local Hugging Face model directory's config.json and building a model from it, with every failure
the libraries raise for a bad directory mapped to an InvalidModelError that names the file and says what to do.

One place for the quant adapter, `eval`, `convert` and the ascendv1 reader, so they give the same messages.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from msmodelslim.core.errors import InvalidModelError

try:  # huggingface_hub >= 0.34 validates configs as strict dataclasses (e.g. hidden_size "big" or not divisible)
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # pragma: no cover - older hub versions raise ValueError/TypeError instead
    class StrictDataclassError(Exception):  # type: ignore[no-redef]
        pass

# What AutoConfig.from_pretrained and AutoModelForCausalLM.from_config/from_pretrained raise for a bad directory
# (transformers 5, huggingface_hub 1.x): OSError (config.json not JSON, unreadable, missing files), ValueError
# (missing or unknown model_type, JSON that is not an object, remote code refused), StrictDataclassError (field
# and architecture validation), ZeroDivisionError (num_attention_heads: 0), RuntimeError (negative tensor
# dimensions; RecursionError for absurdly nested JSON), TypeError (sizes torch cannot hold), KeyError /
# AttributeError / IndexError (config entries the modelling code expects but cannot find).
HF_LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError,
                  RuntimeError, StrictDataclassError)

# Sizes that must be positive when present: zero or negative ones give an empty or unbuildable model.
POSITIVE_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "num_hidden_layers", "vocab_size")


def require_local_dir(path: str | Path, flag: str) -> Path:
    """`path` as a Path when it is a local directory; checked before anything is loaded."""
    path = Path(path)
    if not path.is_dir():
        raise InvalidModelError(f"{flag} {path} is not a local directory; models are never downloaded (download "
                                f"it first, e.g. with `huggingface-cli download`, and pass the directory)")
    return path


def _short(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:400]


def _load_error(path: Path, exc: BaseException, what: str) -> InvalidModelError:
    if "trust_remote_code" in str(exc):
        return InvalidModelError(f"{path} needs its own Python code to load; review it, then pass "
                                 f"--trust_remote_code True")
    return InvalidModelError(f"{what}: {_short(exc)}")


@contextmanager
def model_load_errors(path: Path, what: str | None = None) -> Iterator[None]:
    """Turn what transformers raises for a bad model directory into an InvalidModelError about `what`
    (default: its config.json, for building a model from the config)."""
    try:
        yield
    except HF_LOAD_ERRORS as exc:
        what = what or f"cannot build a model from {Path(path) / 'config.json'} (fix config.json)"
        raise _load_error(Path(path), exc, what) from None


def load_hf_config(path: str | Path, trust_remote_code: bool) -> Any:
    """The directory's config (local files only, no code unless trusted), its sizes checked."""
    from transformers import AutoConfig

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InvalidModelError(f"{path} has no config.json; point at a Hugging Face model directory")
    what = f"{config_file} is not a config transformers can load (fix it, or download the model again)"
    with model_load_errors(path, what):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    for part in (config, getattr(config, "text_config", None)):
        for key in POSITIVE_SIZES:
            value = getattr(part, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                raise InvalidModelError(f"{config_file}: {key} is {value}; model sizes must be positive "
                                        f"(fix config.json)")
    return config
