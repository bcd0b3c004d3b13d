"""Errors a user can act on. The CLI prints their message (no traceback) and exits with `exit_code`."""


class MsModelSlimError(Exception):
    """Base class: something the user can fix. The message says what was wrong and what to do."""

    exit_code = 2


class ConfigError(MsModelSlimError):
    """A bad command-line argument or YAML field."""


class SpecError(ConfigError):
    """A valid plan whose goal cannot be met (e.g. tune's binary_fallback fails even with every candidate in
    float): the plan or its demand must change."""


class InvalidModelError(MsModelSlimError):
    """The model path, checkpoint or model type cannot be used."""


class InvalidDatasetError(MsModelSlimError):
    """Calibration or evaluation data is missing or malformed."""


class UnsupportedError(MsModelSlimError):
    """A valid request this version does not implement (named, never silently replaced)."""


class DeviceError(MsModelSlimError):
    """The requested device is not available."""


class OutputExistsError(MsModelSlimError):
    """The save path holds data and the user did not ask to overwrite it."""

    exit_code = 3


class FormatCheckError(MsModelSlimError):
    """A written checkpoint fails the format checklist."""

    exit_code = 4


class ProcessingError(MsModelSlimError):
    """A processor cannot do its work on this model or data (e.g. a layer received no calibration data)."""


class OutputWriteError(MsModelSlimError):
    """The output could not be written (disk full); the partial output was removed, save_path left as it was."""

    exit_code = 6


class DiskSpaceError(OutputWriteError):
    """Too little free space for the output, found before any weight was read (nothing written)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, container runtimes): unwinds and cleans up exactly like Ctrl-C."""
