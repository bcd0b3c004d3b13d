"""Atomic output directories: write into a hidden sibling, rename into place only when complete."""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from msmodelslim.core.errors import ConfigError, OutputExistsError

FILE_MODE, DIR_MODE = 0o640, 0o750  # what a umask of 027 gives: no group/other write


def check_save_path(save_path: Path, overwrite: bool, model_path: Path | None = None) -> None:
    """Fail before any work if the output location cannot or must not be used."""
    save_path = save_path.resolve()
    if model_path is not None:
        model_path = model_path.resolve()
        if save_path == model_path or model_path in save_path.parents or save_path in model_path.parents:
            raise ConfigError(f"--save_path {save_path} overlaps --model_path {model_path}; choose a separate directory")
    if save_path.exists():
        if not save_path.is_dir():
            raise ConfigError(f"--save_path {save_path} exists and is not a directory")
        if any(save_path.iterdir()) and not overwrite:
            raise OutputExistsError(
                f"--save_path {save_path} is not empty; nothing was changed. Choose a new directory, or pass "
                f"--overwrite to replace its contents once the new checkpoint is complete"
            )
    parent = save_path.parent
    if not parent.is_dir():
        raise ConfigError(f"the parent directory of --save_path ({parent}) does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write into {parent} (permission denied)")


def restrict_permissions(root: Path) -> None:
    os.chmod(root, DIR_MODE)
    for path in root.rglob("*"):
        os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


@contextmanager
def staged_directory(save_path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces `save_path`, on error it is removed.

    An existing `save_path` is only touched after the new output is complete, and only when `overwrite`.
    """
    save_path = save_path.resolve()
    token = uuid.uuid4().hex[:8]
    staging = save_path.parent / f".{save_path.name}.partial-{token}"
    staging.mkdir(mode=DIR_MODE)
    try:
        yield staging
        restrict_permissions(staging)
        if save_path.exists():
            if any(save_path.iterdir()) and not overwrite:  # re-checked: it may have been filled meanwhile
                raise OutputExistsError(f"--save_path {save_path} was filled while we worked; output left in {staging}")
            old = save_path.parent / f".{save_path.name}.old-{token}"
            save_path.rename(old)
            staging.rename(save_path)
            shutil.rmtree(old)
        else:
            staging.rename(save_path)
    except OutputExistsError:
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
