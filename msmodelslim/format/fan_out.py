"""Several output formats from one run (`spec.save` with one saver of each type wanted): every
finished block, float tensor and pass-through tensor goes to each format's writer, in the same order a one-format
run gives it to its only writer, so each format's files are byte-identical to that run's.

With one saver the output is `save_path` itself (unchanged); with several, each format has its own subfolder of
`save_path` (SUBFOLDERS), all written inside the one staging directory and moved into place together."""
from __future__ import annotations

from typing import Callable

from torch import nn

SUBFOLDERS = {"ascendv1_saver": "ascendv1", "compressed_tensors": "compressed_tensors", "mindie_format_saver": "mindie"}


class FanOutWriter:
    """Hands each tensor to every writer of `writers` ({saver type: writer}); neither writer changes the module
    or the tensors it is given (they convert copies), so the second sees exactly what the first saw."""

    def __init__(self, writers: dict[str, object]) -> None:
        self.writers = writers

    def add_float(self, name: str, tensor) -> None:
        for writer in self.writers.values():
            writer.add_float(name, tensor)

    def add_tied(self, name: str, source: str, tensor) -> None:
        for writer in self.writers.values():
            writer.add_tied(name, source, tensor)

    def add_passthrough(self, name: str, tensor) -> None:
        for writer in self.writers.values():
            writer.add_passthrough(name, tensor)

    def add_module_tree(self, prefix: str, root: nn.Module) -> None:
        for writer in self.writers.values():
            writer.add_module_tree(prefix, root)

    # ---- resume (core/resume.py): one checkpoint records every writer's state --------------------------------
    def sync_behind(self) -> Callable[[], None]:
        waits = [writer.sync_behind() for writer in self.writers.values()]

        def wait_all() -> None:
            for wait in waits:
                wait()

        return wait_all

    def resume_state(self) -> dict:
        return {saver: writer.resume_state() for saver, writer in self.writers.items()}

    def restore_state(self, state: dict) -> None:
        for saver, writer in self.writers.items():
            writer.restore_state(state[saver])
