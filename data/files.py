"""Files in and out, flags, and the one way a user is told about bad input.

Every error a user can cause (a bad flag, a malformed line, a checkpoint that is not one, a full disk) is
an InputError: one line naming the file, line or flag, printed by run() instead of a traceback, exit status 2.
Every file the project writes (but out_dir/.lock) goes through atomic_write: beside the target, fsync, rename, so a
crash or a power loss leaves either the old file or the new one under the real name, never half.
"""
import errno
import fcntl
import os
import re
import sys
from contextlib import contextmanager, suppress
from pathlib import Path

import torch


class InputError(Exception):
    pass  # "file:line: what is wrong" — shown as one line, exit 2


def atomic_write(path, write, size=0):  # write(f) fills a temporary file beside path; size: bytes (an estimate), only for a full disk's message
    path = Path(path)  # a link (/dev/stdout, /dev/fd/1: a stream, even into a file), a folder, a device:
    if path.is_symlink() or path.exists() and not path.is_file():  # never renamed over (nor written through: `>> file` would lose it)
        raise InputError(f"{path}: exists and is not a regular file" + " (a link: name its target)" * path.is_symlink())
    tmp = path.parent / f".{path.name}.tmp"  # hidden: not a name of the user's (data.tmp); a crash's leftover is replaced
    try:
        tmp.unlink(missing_ok=True)  # a leftover, or a link: never written through (O_EXCL: the file is one this call made)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as e:
        if os.path.lexists(tmp):  # (nothing to remove under a file or a missing folder)
            tmp.unlink()
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):  # named by the target, not tmp
            raise InputError(f"cannot write {path} ({e.strerror})") from None
        while e is not None and not (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
            e = e.__cause__ or e.__context__  # torch.save reports a full disk as a RuntimeError on top of it
        if e is None:
            raise
        need = f" (needs ~{size / 1e6:,.0f} MB)" if size >= 1e6 else f" (needs ~{size / 1e3:,.0f} kB)" if size else ""
        raise InputError(f"no space left on device writing {path}{need}") from None
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nbytes(obj):  # the tensor bytes in a nest of dicts, lists and tuples: about what torch.save writes
    if isinstance(obj, (dict, list, tuple)):
        return sum(map(nbytes, obj.values() if isinstance(obj, dict) else obj))
    return obj.nbytes if isinstance(obj, torch.Tensor) else 0


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f), nbytes(obj))


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data), len(data))


@contextmanager
def locked_dir(d):
    # make d if needed and hold an exclusive lock on d/.lock (which holds our pid) until the block ends, so that two runs never
    # write one folder. The lock file is removed while still held, and the folders made here and left empty are removed too.
    d, real = Path(d), Path(os.path.realpath(d))  # real: links and `..` resolved, so that the folders made here are known
    made, lock = [p for p in (real, *real.parents) if not p.exists()], real / ".lock"  # made: innermost first
    try:
        real.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # a link: ELOOP
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_nlink == 0:  # its holder removed it between our open and our lock: still taken
            raise BlockingIOError
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except BlockingIOError:  # from flock (or the check above): another run holds the lock
        pid = os.pread(fd, 20, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise InputError(f"--out_dir {d}: in use by another run (pid {pid}); wait for it or choose another --out_dir") from None
    except OSError as e:
        why = "its .lock is a link: remove it" if (e.errno, e.filename) == (errno.ELOOP, str(lock)) else f"cannot write there ({e.strerror})"
        raise InputError(f"--out_dir {d}: " + ("is a file, not a folder" if d.is_file() else why)) from None
    try:
        yield d
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
        with suppress(OSError):  # rmdir refuses a folder anything was written into (by any process): it and those above stay
            for p in made:
                p.rmdir()


def run(main):  # every command's one exit path: one line, never a traceback
    if hasattr(sys.stdout, "reconfigure"):  # (not None: closed, `>&-`; not a StringIO) a path that is not UTF-8 (a Latin-1 folder)
        sys.stdout.reconfigure(errors="surrogateescape")  # is printed as its bytes, as under the C locale, not a traceback
    try:
        main(sys.argv[1:])
    except (InputError, OSError) as e:  # OSError: a folder where a file goes, no permission, ... (the OS's words)
        line = f"error: {e.filename}: {e.strerror}" if getattr(e, "filename", None) else f"error: {e}"
        print(line.replace("\n", "\\n"), file=sys.stderr)  # a newline in a path (or in a file's text) shown as \n: still one line
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C: the interrupt's own message (where it stopped, what is kept)
        print(e.args[0].replace("\n", "\\n") if e.args else "interrupted", file=sys.stderr)
        sys.exit(130)


def flag_help(source, defaults):
    # one line per flag: its default and the comment beside it in the config block of `source` (lines
    # `name = value  # meaning`, or `a, b = 1, 2  # meaning`): the meaning is written once, there
    meaning = {n.strip(): m for names, m in re.findall(r"^([a-z_][\w, ]*?) = .*?  # (.*)$", Path(source).read_text(), re.M)
               for n in names.split(",")}
    return "\n".join(f"  --{k:<16} {v!r:<22} {meaning.get(k, '')}" for k, v in defaults.items())


def parse_flags(argv, defaults, help_text, words_ok=True):
    # -> (words, {flag: value}): --key=value or --key value, typed like its default; words_ok=False: flags only
    words, given, i = [], {}, 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg in ("-h", "--help"):  # where a flag may stand: `--prompt -h` asks about -h
            print(help_text)
            sys.exit(0)
        key, eq, val = arg[2:].partition("=")
        if not arg.startswith("--"):
            if not words_ok:
                raise InputError(f"unexpected argument {arg!r}: flags are --name value (see --help)")
            words.append(arg)
            continue
        if key not in defaults:
            raise InputError(f"unknown flag {arg} (flags: {', '.join('--' + k for k in defaults)})")
        kind, alone = type(defaults[key]), not eq and (i == len(argv) or argv[i].startswith("--"))  # alone: no value follows
        if alone and kind is not bool:  # `--data --out_dir x`: --data was left without its value
            raise InputError(f"flag --{key} needs a value (one that starts with -- is written --{key}=VALUE)")
        elif alone:  # a bool flag alone means true
            val = "true"
        elif not eq:
            val, i = argv[i], i + 1
        try:
            given[key] = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[val.lower()] if kind is bool else kind(val)
        except (KeyError, ValueError):
            raise InputError(f"--{key}: expected {kind.__name__}, got {val!r}") from None
    return words, given
