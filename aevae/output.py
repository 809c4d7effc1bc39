"""What a command writes: files whole or not at all, and text to a stream that may have gone.

One owner for both, which the report's figures and page, the batch job's file, the digit classifier's cache,
`aevae decode`'s PNG, the client commands' lines and `aevae up`'s echo all use. (The model repository writes
its own files: it adds fsync and locks, which a version's durability needs and these do not.)
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path
from typing import Any, Callable


# The standard descriptors the command was started without, which keep_standard_streams_open put /dev/null on:
# a command told to write its result to standard output refuses rather than write it into /dev/null.
closed_at_start: set[int] = set()


def keep_standard_streams_open() -> None:
    """Opens /dev/null on any of descriptors 0-2 that the command was started without (`2>&-`, `>&-`, a
    supervisor that closes them) and gives Python a stream on it. Else the next file opened takes the number:
    gRPC's or ONNX Runtime's log lines to descriptor 2 land inside a shard or PNG being written, and Python,
    which set `sys.stderr` to None, prints errors to standard output (into `aevae decode -o -`'s PNG)."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            closed_at_start.add(fd)
            _devnull_onto(fd)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


def write_whole(path: str | os.PathLike[str], write: Callable[[Path], object], tmp: str | None = None) -> None:
    """`write(temporary)`, then the temporary renamed over `path`; removed again if anything fails, a stop
    included. Readers see the old file or the new one whole: written in place, a full disk, a file-size limit
    or a Ctrl-C left a truncated file under the name, and an earlier file there was lost. `tmp`: the
    temporary's name in the same folder (default `.NAME.PID.partial`).

    What is at `path` stays what it is: a symbolic link is written through (its target gets the file), and a
    device or a FIFO is written into directly (`-o /dev/null` had the rename put a regular file in place of the
    device, and `-o /dev/full` reported success). A folder that does not exist is named as such, not the
    temporary that could not be made in it."""
    path = Path(os.path.realpath(path))
    try:
        mode: int | None = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        write(path)  # a device, a FIFO, a socket: nothing to keep whole, and not ours to replace
        return
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(path.parent))
    temporary = path.with_name(tmp or f".{path.name}.{os.getpid()}.partial")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:  # the write's own error is the one to report
            pass
        raise


def write_text(stream: Any, text: str) -> None:
    """Writes `text` to a text stream; a character its encoding cannot show (PYTHONIOENCODING=ascii, a C
    locale) is written escaped rather than failing the write. OSError as the stream raises it."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding))


def silence(stream: Any) -> None:
    """Points a stream's descriptor at /dev/null once whatever read it has gone (a closed pipe, a full disk):
    what is still buffered, and the interpreter's flush at exit, go there instead of failing again (Python's
    "Exception ignored ... BrokenPipeError")."""
    try:
        _devnull_onto(stream.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _devnull_onto(fd: int) -> None:
    """Descriptor `fd` opened on /dev/null, for reading and writing (whatever it was before is closed)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    if devnull != fd:  # the lowest free number: `fd` itself when it was closed and no lower one is
        os.dup2(devnull, fd)
        os.close(devnull)
