"""Atomic output directories: write into a staging directory, move into place only when complete, and recover
from a crash at any moment so that `save_path` is always absent, the previous checkpoint or the complete new one.

Every directory we write carries a marker file, `.msmodelslim.json`: `{"complete": false, "pid", "host"}` while
it is being written (so a staging directory killed half-way never passes `msmodelslim check`), rewritten with
`"complete": true` as the last step. `--overwrite` replaces only a previous checkpoint (the marker, or an
ascendv1 description / saved practice from an older version), never an arbitrary directory.

Two ways into place:
- sibling (usual): the staging directory `.<name>.partial-<token>` beside `save_path` is renamed over it; an
  existing checkpoint is first renamed aside to `.<name>.old-<token>` and removed after the swap.
- in place, when `save_path` is a mount point (an empty container volume cannot be renamed): staging and the
  set-aside old files live inside it as `.msmodelslim.partial-<token>` / `.msmodelslim.old-<token>`, and the
  files are moved one by one (each rename atomic), with the phase recorded in `save_path`'s marker first.

`recover(save_path)` finishes or undoes whatever a killed run left: a complete new checkpoint whose swap was
interrupted is moved into place, otherwise a set-aside previous checkpoint is restored; stale staging
directories of dead runs are removed. It runs before every `quant`/`convert` and in `msmodelslim check`.

A staging directory that holds a block checkpoint (`RESUME_STATE`, written by core/resume.py after each finished
block) is resumable: `recover` keeps it, `quant --resume` continues in it (`staged_directory(reuse=...)`), and a
`quant` without --resume removes it (`discard_resumable`), saying that --resume would have continued it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from msmodelslim.core.errors import ConfigError, OutputExistsError, OutputWriteError
from msmodelslim.core.faults import fault_point
from msmodelslim.core.logging import get_logger

log = get_logger("format.staging")

FILE_MODE, DIR_MODE = 0o640, 0o750  # what a umask of 027 gives: no group/other write
MARKER = ".msmodelslim.json"
IN_PLACE_PREFIX = ".msmodelslim"
LEGACY_SIGNS = ("quant_model_description.json", "*_best_practice.yaml")  # outputs of versions before the marker
TOKEN = re.compile(r"[0-9a-f]{8}")  # what staged_directory names its directories with: nothing else is touched
STALE_UNMARKED_S = 60  # a staging directory without its marker after this long was killed at birth
RESUME_STATE = Path(".resume") / "state.json"  # inside a staging directory: the last finished block's checkpoint


# ---- markers -------------------------------------------------------------------------------------------------
def write_marker(directory: Path, complete: bool, **extra) -> None:
    """Atomically (write + rename) record the state of an output directory."""
    data = {"tool": "msmodelslim", "complete": complete, "pid": os.getpid(), "host": socket.gethostname(),
            "time": time.time(), **extra}
    tmp = directory / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, directory / MARKER)


def read_marker(directory: Path) -> Optional[dict]:
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def incomplete_reason(directory: Path) -> Optional[str]:
    """Why `directory` is not a finished output of ours (None when it is finished or not ours at all)."""
    marker = read_marker(directory)
    if marker is None:
        return "its marker file is unreadable" if (directory / MARKER).exists() else None
    if marker.get("complete") is not True:
        return (f"it is marked incomplete ({MARKER}): the run writing it (pid {marker.get('pid')}) was interrupted "
                f"or is still running")
    return None


def is_previous_output(directory: Path) -> bool:
    return (directory / MARKER).exists() or any(any(directory.glob(sign)) for sign in LEGACY_SIGNS)


def _owner_alive(directory: Path) -> bool:
    """Whether the run that created a staging directory may still be writing it."""
    marker = read_marker(directory)
    if marker is None:
        try:
            return time.time() - directory.stat().st_mtime < STALE_UNMARKED_S
        except FileNotFoundError:
            return False
    if marker.get("host") != socket.gethostname() or not isinstance(marker.get("pid"), int):
        return True  # another machine's run on a shared disk: not ours to judge
    if marker["pid"] == os.getpid():
        return False
    try:
        os.kill(marker["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- checks before any work ----------------------------------------------------------------------------------
def writes_in_place(save_path: Path) -> bool:
    """A mount point (e.g. an empty container volume) cannot be renamed: its contents are replaced file by file."""
    return save_path.is_dir() and os.path.ismount(save_path)


def _protected(save_path: Path) -> Optional[str]:
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if save_path == Path(save_path.anchor):
        return "the root of the file system"
    if save_path == home:
        return "your home directory"
    if save_path == cwd:
        return "the working directory"
    if save_path in cwd.parents:
        return "a parent of the working directory"
    return None


def _typed_save_path(save_path: Path) -> Path:
    """`save_path` resolved; as typed, an empty string or '.' is refused (it would mean the working directory)."""
    if str(save_path).strip() in ("", "."):
        raise ConfigError(f"--save_path {str(save_path)!r} names the working directory; give the checkpoint a "
                          f"directory of its own, e.g. ./model-w8a8")
    return Path(save_path).expanduser().resolve()


def check_save_path(save_path: Path, overwrite: bool, model_path: Path | None = None, dry_run: bool = False) -> None:
    """Fail before any work if the output location cannot or must not be used. A real run first finishes or
    undoes what a killed earlier run left (which can rename directories); a dry run changes nothing, so it only
    says what the real run will recover, then applies the same checks."""
    save_path = _typed_save_path(save_path)
    # A killed earlier run: a real run puts the previous or the complete new checkpoint back first; a dry run
    # changes nothing and only says what the real run (or 'msmodelslim check') will do.
    recover(save_path, apply=not dry_run)
    what = _protected(save_path)
    if what:
        raise ConfigError(f"--save_path {save_path} is {what}; it is never replaced, --overwrite or not. Give the "
                          f"checkpoint a directory of its own, e.g. {save_path / 'model-w8a8'}")
    if model_path is not None:
        model_path = model_path.resolve()
        if save_path == model_path or model_path in save_path.parents or save_path in model_path.parents:
            raise ConfigError(f"--save_path {save_path} overlaps --model_path {model_path}; choose a separate directory")
    parent = save_path.parent
    if not parent.is_dir():
        raise ConfigError(f"the parent directory of --save_path ({parent}) does not exist; create it first")
    if save_path.exists() and not save_path.is_dir():
        raise ConfigError(f"--save_path {save_path} exists and is not a directory")
    if save_path.exists() and _user_entries(save_path):
        if not overwrite:
            raise OutputExistsError(
                f"--save_path {save_path} is not empty; nothing was changed. Choose a new directory, or pass "
                f"--overwrite to replace its contents once the new checkpoint is complete"
            )
        if not is_previous_output(save_path):
            raise ConfigError(
                f"--save_path {save_path} holds files that are not an msmodelslim checkpoint (no {MARKER} or "
                f"quant_model_description.json); --overwrite only replaces a previous checkpoint. Nothing was "
                f"changed: choose a new or empty directory"
            )
    in_place = writes_in_place(save_path)
    if not os.access(save_path if in_place else parent, os.W_OK):
        raise ConfigError(f"cannot write into {save_path if in_place else parent} (permission denied)")
    if in_place:
        log.info("--save_path %s is a mount point: the checkpoint is written inside it and its files are moved "
                 "into place one by one (completion marker %s written last)", save_path, MARKER)


def _user_entries(save_path: Path) -> list[Path]:
    """What is in `save_path` apart from our own in-place staging directories."""
    return [p for p in save_path.iterdir() if not p.name.startswith(IN_PLACE_PREFIX + ".")]


# ---- permissions and moves -----------------------------------------------------------------------------------
def restrict_permissions(root: Path) -> None:
    os.chmod(root, DIR_MODE)
    for path in root.rglob("*"):
        os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


def _move_entries(source: Path, target: Path, keep_marker: bool = False) -> None:
    """Move every entry of `source` into `target` (idempotent: a rerun continues where a crash stopped)."""
    target.mkdir(mode=DIR_MODE, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.name.startswith(IN_PLACE_PREFIX + ".") and entry.name != MARKER:
            continue  # our staging/old directories stay where they are
        if entry.name == MARKER and keep_marker:
            continue
        os.replace(entry, target / entry.name)


def _sibling(save_path: Path, kind: str, token: str) -> Path:
    return save_path.parent / f".{save_path.name}.{kind}-{token}"


def _in_place_dir(save_path: Path, kind: str, token: str) -> Path:
    return save_path / f"{IN_PLACE_PREFIX}.{kind}-{token}"


# ---- recovery ------------------------------------------------------------------------------------------------
def _tokens(save_path: Path) -> dict[str, dict[str, Path]]:
    """{token: {"partial": path, "old": path}} of the staging and set-aside directories of `save_path`."""
    found: dict[str, dict[str, Path]] = {}
    candidates = []  # (path, "kind-token"); names are compared as text (a save_path may hold glob characters)
    for directory, prefix in ((save_path.parent, f".{save_path.name}."), (save_path, f"{IN_PLACE_PREFIX}.")):
        if directory.is_dir():
            candidates += [(p, p.name[len(prefix):]) for p in directory.iterdir() if p.name.startswith(prefix)]
    for path, rest in candidates:
        kind, _, token = rest.partition("-")
        if kind in ("partial", "old") and TOKEN.fullmatch(token) and path.is_dir():
            found.setdefault(token, {})[kind] = path
    return found


def recover(save_path: Path, apply: bool = True) -> list[str]:
    """Finish or undo what interrupted runs left around `save_path`; returns what was done (also logged).
    With apply=False nothing is touched and the lines say what a real run would do (dry runs)."""
    save_path = save_path.expanduser().resolve()
    done: list[str] = []

    def act(action, line: str) -> None:
        if apply:
            action()
        done.append(line)

    top = read_marker(save_path) if save_path.is_dir() else None
    token = (top or {}).get("swapping")
    if isinstance(token, str) and TOKEN.fullmatch(token):  # an in-place swap was interrupted: roll it forward
        partial, old = _in_place_dir(save_path, "partial", token), _in_place_dir(save_path, "old", token)
        act(lambda: _finish_in_place_swap(save_path, partial, old, top.get("phase", "aside")),
            f"completed the interrupted replacement of {save_path} (new checkpoint now in place)")
    for token, dirs in _tokens(save_path).items():
        partial, old = dirs.get("partial"), dirs.get("old")
        if partial is not None and _owner_alive(partial):
            continue  # another run is writing it right now
        new_complete = partial is not None and (read_marker(partial) or {}).get("complete") is True
        if not save_path.exists():  # killed inside the swap (only sibling directories exist without save_path)
            if new_complete:
                act(lambda: partial.rename(save_path), f"completed the interrupted replacement of {save_path} "
                                                       f"(new checkpoint from {partial} now in place)")
                partial = None
            elif old is not None:
                act(lambda: old.rename(save_path), f"restored the previous checkpoint at {save_path} from {old} "
                                                   f"(the run replacing it was interrupted)")
                old = None
        if partial is not None and not new_complete and (partial / RESUME_STATE).is_file():
            log.info("kept %s: an interrupted run's finished blocks, which 'quant --resume' continues", partial)
            partial = None
        for leftover in (partial, old):
            if leftover is not None and leftover.exists():
                act(lambda: shutil.rmtree(leftover, ignore_errors=True), f"removed {leftover} left by an interrupted run")
    for line in done:
        log.warning("%s%s", "" if apply else "dry run: an interrupted earlier run left work behind; the real run (or "
                                             "'msmodelslim check') will first have ", line)
    return done


def resumable(save_path: Path) -> list[Path]:
    """Staging directories of dead runs of `save_path` that hold a block checkpoint, newest checkpoint first."""
    save_path = save_path.expanduser().resolve()
    found = [dirs["partial"] for dirs in _tokens(save_path).values()
             if "partial" in dirs and (dirs["partial"] / RESUME_STATE).is_file() and not _owner_alive(dirs["partial"])]
    return sorted(found, key=lambda p: (p / RESUME_STATE).stat().st_mtime, reverse=True)


def discard_resumable(save_path: Path, apply: bool = True) -> list[Path]:
    """A run without --resume starts over: remove what killed runs of `save_path` left for --resume, saying so."""
    found = resumable(save_path)
    for partial in found:
        if apply:
            shutil.rmtree(partial, ignore_errors=True)
        log.warning("%s %s: an interrupted run's finished blocks (see its %s); 'quant --resume' would have "
                    "continued from them instead of starting over", "removed" if apply else "dry run: the real run "
                    "(without --resume) will remove", partial, RESUME_STATE)
    return found


# ---- the staged write ----------------------------------------------------------------------------------------
def _swap_sibling(save_path: Path, staging: Path, token: str) -> None:
    if save_path.exists():
        old = _sibling(save_path, "old", token)
        save_path.rename(old)
        fault_point("swap")  # tests: killed between the two renames, recover() must finish the swap
        staging.rename(save_path)
        shutil.rmtree(old)
    else:
        staging.rename(save_path)


def _finish_in_place_swap(save_path: Path, staging: Path, old: Path, phase: str) -> None:
    if phase == "aside":
        _move_entries(save_path, old, keep_marker=True)
        write_marker(save_path, False, swapping=staging.name.rsplit("-", 1)[1], phase="in")
    fault_point("swap")
    if staging.exists():
        _move_entries(staging, save_path, keep_marker=True)
        marker = staging / MARKER
        if marker.exists():
            os.replace(marker, save_path / MARKER)  # the completion marker comes last
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _swap_in_place(save_path: Path, staging: Path, token: str) -> None:
    write_marker(save_path, False, swapping=token, phase="aside")
    _finish_in_place_swap(save_path, staging, _in_place_dir(save_path, "old", token), "aside")


@contextmanager
def staged_directory(save_path: Path, overwrite: bool, reuse: Optional[Path] = None) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces `save_path`, on error it is removed.
    `reuse`: a killed run's resumable staging directory (`resumable`), continued instead of a new one.

    An existing `save_path` is only touched after the new output is complete, and only when `overwrite`.
    """
    save_path = save_path.expanduser().resolve()
    recover(save_path)
    in_place = writes_in_place(save_path)
    if reuse is not None:
        staging, token = reuse, reuse.name.rsplit("-", 1)[1]
        write_marker(staging, False)  # ours now (this pid): no other run may take it
    else:
        token = uuid.uuid4().hex[:8]
        staging = _in_place_dir(save_path, "partial", token) if in_place else _sibling(save_path, "partial", token)
        staging.mkdir(mode=DIR_MODE)
    try:
        write_marker(staging, False)
        yield staging
        restrict_permissions(staging)
        if save_path.exists() and _user_entries(save_path) and not overwrite:  # it may have been filled meanwhile
            raise OutputExistsError(f"--save_path {save_path} was filled while we worked; the new output was "
                                    f"discarded and nothing there was changed")
        write_marker(staging, True)
        os.chmod(staging / MARKER, FILE_MODE)
        (_swap_in_place if in_place else _swap_sibling)(save_path, staging, token)
    except BaseException as exc:
        if staging.exists() and (read_marker(staging) or {}).get("complete") is not True:
            shutil.rmtree(staging, ignore_errors=True)
        else:  # stopped inside the swap (Ctrl-C, SIGTERM): put a whole checkpoint back in place now
            recover(save_path)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputWriteError(f"no space left on the disk of {save_path.parent} while writing the checkpoint "
                                   f"({exc.strerror}); the partial output was removed and {save_path} was not "
                                   f"changed. Free space and run again") from None
        raise
