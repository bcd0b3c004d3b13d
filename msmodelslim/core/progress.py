"""A heartbeat for steps that have no progress bar of their own (loading a model, converting a file, generating
text): the user always sees that work goes on and for how long. On a terminal one line is redrawn every half
second; elsewhere (logs, CI) a line is printed every `every_s` seconds. Silent when the log level hides INFO."""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from msmodelslim.core.logging import progress_disabled

FRAMES = "|/-\\"


@contextmanager
def spinner(label: str, every_s: float = 5.0) -> Iterator[None]:
    if progress_disabled():
        yield
        return
    stream, started, done = sys.stderr, time.perf_counter(), threading.Event()
    tty = stream.isatty()

    def beat() -> None:
        frame = 0
        while not done.wait(0.5 if tty else every_s):
            elapsed = time.perf_counter() - started
            if tty:
                stream.write(f"\r{FRAMES[frame % 4]} {label} {elapsed:5.0f} s")
                frame += 1
            else:
                stream.write(f"{label}: still working, {elapsed:.0f} s\n")
            stream.flush()

    stream.write(f"{label} ...{'' if tty else chr(10)}")
    stream.flush()
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        end = "\r" if tty else ""
        stream.write(f"{end}{label}: done in {time.perf_counter() - started:.1f} s\n")
        stream.flush()
