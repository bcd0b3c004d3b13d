"""Fault injection for the crash-safety tests: `MSMODELSLIM_FAULT_AT=<point>` makes the process kill itself
(SIGKILL, no cleanup, as a power cut or the OOM killer would) when it reaches that named point, or hang there
with `MSMODELSLIM_FAULT_ACTION=hang` (so a test can signal it at a known moment). Points: `loaded` (model and
plan ready), `calibration` (a calibration forward done), `block:<i>` (block i written), `checkpoint:<i>`
(block i's resume checkpoint recorded), `description`
(description/config files written, before the checks), `swap` (inside the replacement of an existing
checkpoint). Unset in normal use; reading one environment variable costs nothing."""
from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "MSMODELSLIM_FAULT_AT"
ACTION_ENV = "MSMODELSLIM_FAULT_ACTION"


def fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) != name:
        return
    if os.environ.get(ACTION_ENV) == "hang":
        while True:
            time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)
