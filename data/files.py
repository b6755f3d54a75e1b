"""Files in and out, and the one way a user is told about bad input.

Every error a user can cause (a bad flag, a malformed line, a checkpoint that is not one) is an
InputError: one line naming the file, line or flag, printed instead of a traceback, exit status 2.
Every file the project writes goes through atomic_write: beside the target, fsync, rename, so a
crash or a power loss leaves either the old file or the new one under the real name, never half.
"""
import os
from pathlib import Path

import torch


class InputError(Exception):
    pass  # "file:line: what is wrong" — shown as one line, exit 2


def atomic_write(path, write):
    # write(f) fills a temporary file beside path; fsync it, rename it over path, fsync the folder
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())
