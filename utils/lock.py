"""One writer per output folder: an exclusive lock that train.py, test.py and extract_features.py hold for a run.

The lock is ``fcntl.flock`` on ``<folder>/.t2l.lock``. The kernel releases it when the holding process ends, however
it ends (an exception, Ctrl-C, SIGKILL, a crashed machine's reboot), so a lock file left behind by a killed run is
never mistaken for a live one: the next run takes it over and says so. The file holds who took the lock (pid,
host, command, start time), which is what a second run names when it is refused.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

LOCK_NAME = ".t2l.lock"


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock; the message names the folder and that process."""


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its details yet)"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('command', '?')}), "
            f"started {when}")


def _busy(folder, holder: dict) -> FolderLockedError:
    return FolderLockedError(f"output folder {folder} is in use by another run: {_describe(holder)}. Two runs writing "
                             f"into one folder would overwrite each other's files; wait for it to end, or choose "
                             f"another output folder")


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
        return json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, ValueError):
        return {}


class FolderLock:
    """Exclusive lock on an output folder, held from :meth:`acquire` until :meth:`release` or the process's end.

    ``with FolderLock(out, "train.py"):`` holds it for the block. A folder already locked by a live process raises
    :class:`FolderLockedError` at once (no waiting), naming the folder and the process. On file systems without
    ``flock`` (some network mounts) the run goes on with a warning that two runs would not be detected.
    """

    def __init__(self, folder: str | os.PathLike, owner: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.owner = owner
        self._fd: Optional[int] = None
        self.previous: dict = {}

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise _busy(self.folder, holder) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    logger.warning("cannot lock %s (%s): this file system has no locks, so a second run writing into "
                                   "the same folder would not be detected", self.folder, e.strerror)
                    return self
                raise
            # The holder before us may have deleted the file between our open and our lock: then we locked a file
            # no one else will ever open. Lock the file that is at the path now instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.previous = _read_holder(fd)  # a killed run's record: its lock died with it
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join([self.owner, *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
        self._fd = fd
        return self

    def log_takeover(self) -> None:
        """Say (once logging is set up) that a lock file of a killed run was found and taken over."""
        if self.previous:
            logger.info("%s: the lock file of an earlier run (%s) was left behind; that run is no longer running, "
                        "so this run took the folder over", self.folder, _describe(self.previous))

    def release(self) -> None:
        """Delete the lock file and release the lock (the deletion first, while it is still ours)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_if_locked(folder: str | os.PathLike) -> Optional[dict]:
    """The record of the live process holding ``folder``'s lock, or None when it is free; takes no lock."""
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDWR)
    except OSError:  # no lock file (or no folder): free
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # also releases the probe's own lock
    return None


def exit_if_busy(owner: str, argv: list, folder_option: Optional[str] = None) -> None:
    """Stop a command line at once when its output folder is locked by a live run, before its heavy imports.

    The folder is the value of ``folder_option`` (``--out``) in ``argv``, or else the ``output_dir`` of the config
    that ``--config``/``--opts`` give. This is only a fast first look, so that a refused run ends in a fraction of
    a second instead of after the seconds ``import torch`` takes: the run still takes the lock for real later, and
    anything unparsable here is left for the script's own error messages.
    """
    import argparse

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun: ranks of a later-starting node would find their own rank 0's lock; the real lock decides.
        return
    p = argparse.ArgumentParser(add_help=False)
    if folder_option:
        p.add_argument(folder_option, dest="folder")
    else:
        p.add_argument("--config")
        p.add_argument("--opts", nargs="*", default=[])
    try:
        args, _ = p.parse_known_args(argv)
        if folder_option:
            folder = args.folder
        else:
            from utils.config_files import read_config_tree  # plain YAML: no torch, no schema

            folder = read_config_tree(args.config, args.opts).get("output_dir") if args.config else None
            folder = folder if isinstance(folder, str) else None  # (a default or odd output_dir: the real lock)
    except (Exception, SystemExit):
        return
    holder = holder_if_locked(folder) if folder else None
    if holder is not None:
        logging.getLogger(owner).error("%s", _busy(folder, holder))
        sys.exit(2 if folder_option else 1)  # the script's own status for bad input


def lock_output_folder(folder: str | os.PathLike, owner: str, dist_info=None) -> Optional[FolderLock]:
    """Take ``folder``'s lock on rank 0 (the only rank that writes files); every rank raises if it is taken.

    Returns the held lock on rank 0 (release it when the run ends) and None on the other ranks.
    """
    lock, error = None, None
    if dist_info is None or dist_info.is_main:
        try:
            lock = FolderLock(folder, owner).acquire()
        except FolderLockedError as e:
            error = str(e)
    if dist_info is not None and dist_info.enabled:
        from utils import distributed

        error = distributed.all_gather_objects(error)[0]  # rank 0's outcome, so that no rank waits for the others
    if error:
        raise FolderLockedError(error)
    return lock
