"""Logging set up from MSMODELSLIM_LOG_LEVEL (info by default, debug for tracebacks and detail)."""
import logging
import os

from msmodelslim.core.errors import ConfigError

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def level_from_env() -> int:
    raw = os.environ.get("MSMODELSLIM_LOG_LEVEL", "info").strip().lower()
    if raw not in _LEVELS:
        raise ConfigError(
            f"MSMODELSLIM_LOG_LEVEL={raw!r} is not one of {', '.join(_LEVELS)}; unset it or pick one of these."
        )
    return _LEVELS[raw]


def setup_logging() -> int:
    level = level_from_env()
    logger = logging.getLogger("msmodelslim")
    logger.handlers.clear()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return level


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"msmodelslim.{name}")


def progress_disabled() -> bool:
    """Progress bars go to stderr; hide them when the log level hides INFO."""
    return logging.getLogger("msmodelslim").getEffectiveLevel() > logging.INFO
