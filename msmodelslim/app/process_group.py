"""Child processes run in their own process group, so that stopping one stops everything it forked (vLLM's
workers, AISBench's tasks): SIGTERM to the group, SIGKILL to what is left after a grace period."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from msmodelslim.core.errors import ProcessingError
from msmodelslim.core.logging import get_logger

log = get_logger("app.tune")

GROUP_EXIT_SECONDS = 10.0
LOG_TAIL_LINES = 25


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return "(no log)"
    text = path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:  # the whole group is gone already
        pass


def stop_process_group(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the whole group (vLLM forks workers), SIGKILL to whatever is left after `grace` seconds (or at
    once on a second Ctrl-C); the leader is reaped."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("process group %d ignored SIGTERM for %.0f s: killing it", process.pid, grace)
    finally:
        _signal_group(process, signal.SIGKILL)  # the leader if it hung, or workers that outlived it
        process.wait()
        _wait_until_group_gone(process.pid)


def _wait_until_group_gone(group: int, seconds: float = GROUP_EXIT_SECONDS) -> None:
    """Workers die of SIGKILL a moment after it is sent; wait for that, so the next engine finds the port and
    the accelerator memory free."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    log.warning("process group %d still has processes %.0f s after SIGKILL", group, seconds)




def run_in_own_group(argv: list[str], cwd: Path, log_path: Path, timeout: float) -> int:
    """Run a program with its output in log_path; on timeout or Ctrl-C its whole process group is stopped."""
    with log_path.open("ab") as output:
        process = subprocess.Popen(argv, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ProcessingError(f"{argv[0]} ran longer than evaluation.aisbench.timeout {timeout:g} s and was "
                              f"stopped; {log_path} ends with:\n{log_tail(log_path)}") from None
    finally:
        stop_process_group(process, grace=5.0)
