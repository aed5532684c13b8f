"""Writing outputs: all new files or all old ones, never a mix, and nothing left behind.

The commit protocol (:class:`OutputSet`), used for every file vitprune writes:

1. **Check first** (:func:`check_destination`): the location is validated before any work — no
   final path is a folder, the nearest existing folder above it is a folder (not a file) and files
   can be created there (a probe folder is made and removed: ``os.access`` says yes for root on a
   read-only mount and for ``/proc``).
2. **Stage**: missing folders are created, staging folders of earlier runs on the same outputs
   whose owner is gone (killed with SIGKILL) are removed (:func:`remove_stale_staging`), then a
   hidden folder ``.NAME.vitprune-PID.START.HOST-XXXX`` (its owner in its name) beside the outputs
   receives every new file under its final name. Nothing at a final path changes yet.
3. **Swap** (:meth:`OutputSet.commit`): each old file of the set (the ones being replaced and the
   *stale* ones — a kind this run does not write, e.g. ``PREFIX.onnx`` under ``--no-export``) is
   renamed into the staging folder as a backup, then each staged file is renamed to its final
   path. Renames within one folder are atomic; if one fails, the new files already moved are taken
   back and every backup is restored, so the folder shows the old set again. Staged files get the
   mode ``0o666 & ~umask`` first (``tempfile`` creates 0600 files) and are fsynced.
4. **Clean up**: the staging folder (with the backups) is removed; on failure, so are the folders
   step 2 created, when empty.

Signals: :func:`termination_as_interrupt` turns SIGTERM and SIGHUP into :class:`Interrupted`, a
``KeyboardInterrupt`` like SIGINT's, so one cleanup path serves exceptions and all three signals.
The swap and the cleanup run with those signals *deferred* (:func:`signals_deferred`): a signal
arriving then is delivered right after, so it can neither leave half a swap nor skip a cleanup.
Only SIGKILL (or a power cut) can leave a ``.NAME.vitprune-*`` folder behind; the next run on the
same outputs removes it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

from vitprune.errors import InputError, OutputError, VitpruneError

__all__ = ["Interrupted", "OutputSet", "OUTPUT_KINDS", "atomic_write", "check_destination", "file_mode",
           "output_paths", "remove_stale_staging", "signals_deferred", "termination_as_interrupt", "through_memory"]

#: What ``compress`` writes at PREFIX, in order: PREFIX.onnx, PREFIX.pt2, PREFIX.json.
OUTPUT_KINDS: tuple[str, ...] = ("onnx", "pt2", "json")

_STAGING_TAG = ".vitprune-"
_BACKUPS = ".old"  # subfolder of the staging folder that holds the old files during the swap
#: The signals that end a run; SIGHUP does not exist on Windows.
_ENDING = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s)


class Interrupted(KeyboardInterrupt):
    """A run ended by a signal; ``signum`` says which (the CLI exits with 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


# ---------------------------------------------------------------------------------------------- signals
def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Interrupted` for the duration (SIGINT already raises
    ``KeyboardInterrupt``), so ``finally`` blocks and :class:`OutputSet` clean up on them too. The
    previous handlers come back afterwards. Outside the main thread Python cannot install
    handlers, and this does nothing."""
    if not _main_thread():
        yield
        return
    previous = {}
    for sig in _ENDING:
        if sig != signal.SIGINT:
            previous[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            _restore(sig, handler)


def _restore(sig: int, handler: Any) -> None:
    # None: the handler was set outside Python (an embedding program); the default is the best guess
    signal.signal(sig, signal.SIG_DFL if handler is None else handler)


_deferring = threading.local()  # whether a signals_deferred block is open (main thread only)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends, then deliver the first one that came.

    Done with Python handlers, not ``pthread_sigmask``: a mask covers the calling thread only, and
    torch's and ONNX Runtime's worker threads would still take the signal. Nested uses defer to the
    outermost one. Outside the main thread (where handlers cannot be set) nothing is deferred."""
    if not _main_thread() or getattr(_deferring, "active", False):
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, f: pending.append(s)) for sig in _ENDING}
    _deferring.active = True
    try:
        yield
    finally:
        _deferring.active = False
        for sig, handler in previous.items():
            _restore(sig, handler)
        if pending:
            _redeliver(pending[0], previous[pending[0]])


def _redeliver(signum: int, handler: Any) -> None:
    """What the handler in place would have done with ``signum``."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)  # the default action: end the process


# ---------------------------------------------------------------------------------------------- checks
def file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open()`` would give a new file."""
    mask = _read_umask()
    return 0o666 & ~mask


def _read_umask() -> int:
    # /proc tells without changing anything; os.umask can only be read by setting it (racy)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_destination(paths: Sequence[str | os.PathLike], what: str = "--out") -> None:
    """Refuse, before any work, a set of output paths that could not be written.

    All ``paths`` share one folder. Raises :class:`InputError` naming ``what`` (the flag) when a
    path is a folder, when an existing file there cannot be replaced (immutable or append-only, a
    mount point, another user's file in a sticky folder), when something above the folder is a
    file, or when no file can be created there (read-only, ``/proc``, no permission)."""
    for p in paths:
        if os.path.isdir(p):
            raise InputError(f"{what}: {os.fspath(p)} is a folder; vitprune writes a file there and does not "
                             f"replace folders")
        why = _unreplaceable(os.fspath(p))
        if why:
            raise InputError(f"{what}: {os.fspath(p)} exists and cannot be replaced ({why}); fix that or choose "
                             f"another output")
    folder = os.path.dirname(os.path.abspath(paths[0]))
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    shown = os.path.relpath(existing) if not os.path.isabs(os.fspath(paths[0])) else existing
    if not os.path.isdir(existing):
        raise InputError(f"{what}: {shown} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".vitprune-probe-", dir=existing))
    except OSError as e:
        raise InputError(f"{what}: cannot create files in {shown} ({e.strerror or e})") from None


#: ``FS_IOC_GETFLAGS`` and the inode flags that forbid renaming a file away (Linux, ``chattr +i/+a``).
_FS_IOC_GETFLAGS = 0x80086601
_NO_RENAME_FLAGS = {0x10: "immutable (chattr +i)", 0x20: "append-only (chattr +a)"}


def _unreplaceable(path: str) -> str | None:
    """Why the swap could not rename the existing ``path`` away, or None: read without changing
    anything (a rename-and-back probe could strand the file under another name)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None  # nothing there (or not visible): the folder checks cover the rest
    if os.path.realpath(path) in _mount_points():
        return "it is a mount point"
    folder = os.stat(os.path.dirname(os.path.abspath(path)))
    euid = os.geteuid() if hasattr(os, "geteuid") else 0
    if folder.st_mode & stat.S_ISVTX and euid not in (0, st.st_uid, folder.st_uid):
        return "another user's file in a folder with the sticky bit"
    return _inode_flags_problem(path) if stat.S_ISREG(st.st_mode) else None


def _inode_flags_problem(path: str) -> str | None:
    try:
        import fcntl
        import struct

        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        try:
            flags = struct.unpack("l", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
        finally:
            os.close(fd)
    except (ImportError, OSError):
        return None  # no such flags here (Windows, a filesystem without them, no read permission)
    return next((text for bit, text in _NO_RENAME_FLAGS.items() if flags & bit), None)


def _mount_points() -> set[str]:
    try:
        with open("/proc/self/mountinfo") as f:
            return {line.split()[4].replace("\\040", " ") for line in f if len(line.split()) > 4}
    except OSError:
        return set()


# ---------------------------------------------------------------------------------------------- debris
def _start_ticks(pid: int | str) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _owner_tag() -> str:
    """``PID.START.HOST``: who owns a staging folder, written into its name (atomic with its creation)."""
    return f"{os.getpid()}.{_start_ticks('self') or 0}.{_host_tag()}"


def _owner_is_gone(owner: str) -> bool:
    """Whether the run named by ``owner`` (see :func:`_owner_tag`) has ended: same host, and its
    pid is free or now belongs to a process that started at another time."""
    parts = owner.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or parts[2] != _host_tag():
        return False  # another host's run (a shared folder) or an older vitprune: not ours to judge
    try:
        os.kill(int(parts[0]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        pass  # alive, another user's
    now = _start_ticks(parts[0])
    return now is not None and parts[1] != "0" and now != parts[1]


def remove_stale_staging(folder: str, names: Sequence[str]) -> list[str]:
    """Remove the staging folders left in ``folder`` by runs on the same outputs (``names``) that were
    killed (SIGKILL, a power cut), i.e. whose owner is gone; returns those removed. A folder that
    still holds old files from an interrupted swap (``.old``) is kept: it may be their only copy."""
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        name = next((n for n in names if entry.startswith(f".{n}{_STAGING_TAG}")), None)
        if name is None:
            continue
        path = os.path.join(folder, entry)
        owner = entry[len(f".{name}{_STAGING_TAG}"):].rsplit("-", 1)[0]
        if os.path.isdir(path) and not os.path.islink(path) and _owner_is_gone(owner) \
                and not _has_backups(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _has_backups(staging: str) -> bool:
    try:
        return bool(os.listdir(os.path.join(staging, _BACKUPS)))
    except OSError:
        return False


def through_memory(fill: Callable[[IO[bytes]], Any]) -> Callable[[IO[bytes]], None]:
    """``fill`` run on an in-memory buffer whose bytes are then written with Python's own ``write``.
    torch's C++ zip writer turns a full disk into an abort (``torch.export.save``: exit 134, a C++
    stack) or a RuntimeError (``torch.save``); Python's write raises ``OSError``, which an
    :class:`OutputSet` refuses in one line (exit 2) with the old files kept. Costs one copy in memory."""
    def write(f: IO[bytes]) -> None:
        buffer = io.BytesIO()
        fill(buffer)
        f.write(buffer.getbuffer())
    return write


# ---------------------------------------------------------------------------------------------- the set
def output_paths(prefix: str | os.PathLike, export: bool = True) -> tuple[dict[str, str], list[str]]:
    """``({kind: PREFIX.kind} to write, [PREFIX.kind to remove as stale])`` for a run with or
    without ONNX export: a set on disk always describes one model."""
    prefix = os.fspath(prefix)
    kinds = [k for k in OUTPUT_KINDS if export or k != "onnx"]
    return {k: f"{prefix}.{k}" for k in kinds}, [f"{prefix}.{k}" for k in OUTPUT_KINDS if k not in kinds]


class OutputSet:
    """Stage files, then make them visible together (see the module docstring).

    Usage (``write_onnx``/``write_json`` stand for whatever fills the files)::

        with OutputSet({"onnx": "out/m.onnx", "json": "out/m.json"}, stale=["out/m.pt2"]) as out:
            write_onnx(out.path("onnx"))
            write_json(out.path("json"))
            out.commit()   # out/m.onnx and out/m.json appear, out/m.pt2 goes, in one swap

    Leaving the block without :meth:`commit` (an exception, a signal) discards the staged files and
    the folders this set created; the old files were never touched."""

    def __init__(self, files: Mapping[str, str | os.PathLike], stale: Sequence[str | os.PathLike] = ()):
        if not files:
            raise ValueError("an OutputSet needs at least one file")
        self.files = {kind: os.path.abspath(os.fspath(p)) for kind, p in files.items()}
        self.stale = [p for p in (os.path.abspath(os.fspath(s)) for s in stale) if p not in self.files.values()]
        folders = {os.path.dirname(p) for p in [*self.files.values(), *self.stale]}
        if len(folders) != 1:
            raise ValueError(f"the files of an OutputSet share one folder, got {sorted(folders)}")
        self.folder = folders.pop()
        self._staging: str | None = None
        self._created: list[str] = []
        self._committed = False

    def __enter__(self) -> "OutputSet":
        check_destination([*self.files.values(), *self.stale])
        try:
            with signals_deferred():  # a folder made is a folder recorded, so it can be removed
                self._created = _make_folders(self.folder)
                names = [os.path.basename(p) for p in [*self.files.values(), *self.stale]]
                remove_stale_staging(self.folder, names)
                self._staging = tempfile.mkdtemp(prefix=f".{names[0]}{_STAGING_TAG}{_owner_tag()}-",
                                                 dir=self.folder)
        except BaseException as e:  # also a signal delivered as the deferral ends
            self._discard()
            if isinstance(e, OSError):
                raise OutputError(f"cannot write the outputs in {self.folder}: {e}") from e
            raise
        return self

    def path(self, kind: str) -> str:
        """Where to write ``kind`` now: its final name, inside the hidden staging folder."""
        if self._staging is None:
            raise RuntimeError("OutputSet.path() is only valid inside the with block")
        return os.path.join(self._staging, os.path.basename(self.files[kind]))

    def commit(self) -> dict[str, str]:
        """Swap every staged file in and every old file (replaced or stale) out, all or nothing."""
        missing = [k for k in self.files if not os.path.isfile(self.path(k))]
        if missing:
            raise RuntimeError(f"OutputSet.commit(): nothing was written for {', '.join(missing)}")
        with signals_deferred():
            mode = file_mode()
            for kind in self.files:
                _settle(self.path(kind), mode)
            _swap([(self.path(k), p) for k, p in self.files.items()], self.stale, self._staging)
            self._committed = True
        return dict(self.files)

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        self._discard()
        if isinstance(error, OSError) and not isinstance(error, VitpruneError):
            # no space left, a permission changed mid-run: the environment's fault, not a bug (exit 2)
            raise OutputError(f"cannot write the outputs in {self.folder}: {error}; "
                              f"the files there were left as they were") from error

    def _discard(self) -> None:
        """Remove the staging folder (staged files, backups of replaced files) and, unless the set
        was committed, the folders this set created."""
        with signals_deferred():
            if self._staging is not None and not self._stranded_backups():
                shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
            if not self._committed:
                _remove_empty(self._created)
                self._created = []

    def _stranded_backups(self) -> bool:
        """Whether old files are still in the staging folder after a failed swap whose rollback
        failed too: then the folder is kept (the error names it), never deleted with them."""
        if self._committed or self._staging is None:
            return False  # after a commit the backups are the replaced files: gone on purpose
        return _has_backups(self._staging)


def _make_folders(folder: str) -> list[str]:
    """Create ``folder`` and its missing parents; the ones created, deepest first."""
    created = []
    probe = folder
    while not os.path.isdir(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    try:
        for d in reversed(created):
            os.mkdir(d)
    except BaseException:
        _remove_empty(created)
        raise
    return created


def _remove_empty(folders: list[str]) -> None:
    for d in folders:  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _settle(path: str, mode: int) -> None:
    """Give a staged file the umask's mode and get its bytes to disk before it is renamed in."""
    os.chmod(path, mode)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _swap(new: list[tuple[str, str]], stale: list[str], staging: str) -> None:
    """Rename the old files into ``staging`` and the ``new`` (staged, final) pairs into place; on
    any failure put everything back as it was and re-raise."""
    backups: list[tuple[str, str]] = []
    placed: list[tuple[str, str]] = []
    try:
        os.makedirs(os.path.join(staging, _BACKUPS), exist_ok=True)
        for final in [f for _, f in new] + stale:
            if os.path.lexists(final):
                if os.path.isdir(final) and not os.path.islink(final):
                    raise InputError(f"{final} is a folder; vitprune does not replace folders")
                backup = os.path.join(staging, _BACKUPS, os.path.basename(final))
                os.replace(final, backup)
                backups.append((final, backup))
        for staged, final in new:
            os.replace(staged, final)
            placed.append((staged, final))
    except BaseException as e:
        problems = _undo(placed, backups)
        if problems:
            raise OutputError(f"writing the outputs failed ({e}) and restoring the old files failed too: "
                              f"{'; '.join(problems)}; the old files are in {staging}") from e
        raise
    _sync_folder(os.path.dirname(new[0][1]))


def _undo(placed: list[tuple[str, str]], backups: list[tuple[str, str]]) -> list[str]:
    problems = []
    for staged, final in reversed(placed):
        try:
            os.replace(final, staged)
        except OSError as e:
            problems.append(f"{final}: {e}")
    for final, backup in reversed(backups):
        try:
            os.replace(backup, final)
        except OSError as e:
            problems.append(f"{final}: {e}")
    return problems


def _sync_folder(folder: str) -> None:
    """Make the renames durable (a no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write one file through an :class:`OutputSet`: ``write(f)`` fills it, then it replaces
    ``path`` in one rename, or nothing changes."""
    with OutputSet({"file": path}) as out:
        with open(out.path("file"), "wb") as f:
            write(f)
        out.commit()
