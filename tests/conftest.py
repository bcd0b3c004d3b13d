import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3_bf16_tied(tmp_path_factory) -> Path:
    import torch

    return make_tiny_model(tmp_path_factory.mktemp("qwen3"), "qwen3", dtype=torch.bfloat16, tie=True)


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe")


@pytest.fixture(scope="session")
def tiny_deepseek_v3(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("deepseek_v3"), "deepseek_v3")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines():
    """Messages of the msmodelslim loggers (which do not propagate once the CLI has set logging up)."""
    logger, handler = logging.getLogger("msmodelslim"), _Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def sampling_calls(monkeypatch) -> list:
    """Every diffusers WanPipeline sampling run (calibration and evaluation alike): the prompts it was called with."""
    import diffusers

    calls: list = []
    original = diffusers.WanPipeline.__call__

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("prompt"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.WanPipeline, "__call__", counted)
    return calls


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    """A few small PNG images for the vision-language tests (tests/tiny_vlm.make_images)."""
    from tiny_vlm import make_images

    return make_images(tmp_path_factory.mktemp("images"))
