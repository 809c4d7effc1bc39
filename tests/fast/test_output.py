"""aevae/output.py: files written whole, and what is at the output's name left what it is."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from aevae.output import write_whole


def _write(data: bytes):  # type: ignore[no-untyped-def]
    return lambda path: Path(path).write_bytes(data)


def test_a_file_is_replaced_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"old")
    write_whole(tmp_path / "a.png", _write(b"new"))
    assert (tmp_path / "a.png").read_bytes() == b"new" and os.listdir(tmp_path) == ["a.png"]


def test_a_symlink_is_written_through_not_replaced(tmp_path: Path) -> None:
    """`-o link.png` put a regular file in place of the link and left its target as it was."""
    (tmp_path / "target.png").write_bytes(b"old")
    (tmp_path / "link.png").symlink_to("target.png")
    write_whole(tmp_path / "link.png", _write(b"new"))
    assert (tmp_path / "link.png").is_symlink() and (tmp_path / "target.png").read_bytes() == b"new"


def test_a_fifo_and_a_device_are_written_into_not_replaced(tmp_path: Path) -> None:
    """As root, `aevae decode -o /dev/null` replaced the device with a PNG file, and `-o /dev/full` said it
    had written the image."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_whole(fifo, _write(b"through the pipe"))
    reader.join(10)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    if os.path.exists("/dev/full"):
        with pytest.raises(OSError) as full:
            write_whole("/dev/full", _write(b"x" * 65536))
        assert full.value.errno == errno.ENOSPC and stat.S_ISCHR(os.stat("/dev/full").st_mode)
    write_whole(os.devnull, _write(b"gone"))
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_a_missing_folder_is_named_not_the_temporary(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        write_whole(tmp_path / "no" / "a.png", _write(b"x"))
    assert missing.value.filename == str(tmp_path / "no") and "partial" not in str(missing.value)
