"""utils.io: the atomic writers every file writer of the project (library, scripts, dataset tools) goes through."""
import errno
import os
import re

import pytest

from utils.io import atomic_path, atomic_write, atomic_write_text, remove_stale_tmp


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_text_is_written_as_is_with_an_ordinary_mode_and_no_temporary_left(tmp_path):
    path = tmp_path / "sub" / "list.txt"
    atomic_write_text(path, "a b\r\nc é\n")
    assert path.read_bytes() == "a b\r\nc é\n".encode("utf-8")  # no newline translation
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask()  # as open() would make it, not mkstemp's 0600
    path.chmod(0o640)
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o640  # a rewrite keeps the file's mode
    assert sorted(p.name for p in path.parent.iterdir()) == ["list.txt"]


def test_a_failed_write_keeps_the_previous_file_and_names_it(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def full_disk(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match=rf"could not write results file {re.escape(str(path))}: \[Errno 28\] No space "
                                      rf"left on device; the previous file \(if any\) is unchanged") as info:
        atomic_write(path, full_disk, what="results file")
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(ZeroDivisionError):  # other errors as they are
        atomic_write(path, lambda f: 1 / 0)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_writer_by_file_name_commits_only_a_finished_file(tmp_path):
    path = tmp_path / "index.faiss"
    with atomic_path(path, what="index") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".index.faiss.") and not path.exists()
        tmp.write_bytes(b"complete")
    assert path.read_bytes() == b"complete"
    with pytest.raises(ConnectionResetError):  # name_errors=False: a download's network error stays as it is
        with atomic_path(path, name_errors=False) as tmp:
            tmp.write_bytes(b"partial")
            raise ConnectionResetError("reset by peer")
    assert path.read_bytes() == b"complete" and sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss"]


def test_leftover_temporaries_are_recognised_and_removed(tmp_path):
    (tmp_path / ".last.pt.abcd1234.tmp").write_bytes(b"x")
    (tmp_path / ".last.pt.tmp").write_bytes(b"x")  # not a name these writers make: kept
    (tmp_path / "last.pt").write_bytes(b"x")
    assert remove_stale_tmp(tmp_path) == [".last.pt.abcd1234.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.pt.tmp", "last.pt"]
