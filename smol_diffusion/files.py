"""Files that never lose a run's work: free space checked before a large write, out-of-space
errors that say so, temporary files that do not outlive the write they belong to, and one live
run per output folder."""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def shown(path: str | Path) -> str:
    """A path as text that can always be printed: bytes that are not valid in the file
    system's encoding (a name written on another system) are shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def size_text(n: int) -> str:
    """Bytes for a person: 612.4 MB."""
    units = ("bytes", "kB", "MB", "GB", "TB")
    i = min(len(units) - 1, max(0, (len(str(int(n))) - 1) // 3))
    return f"{n} bytes" if i == 0 else f"{n / 1000 ** i:.1f} {units[i]}"


def no_space(path: str | Path, needed: int, what: str) -> OSError:
    """The error for `what` not fitting at `path`: the folder, the space needed and free."""
    folder = Path(path).parent
    free = shutil.disk_usage(folder).free
    return OSError(errno.ENOSPC, f"no space for {what} {shown(path)}: it needs about "
                   f"{size_text(needed)} and {size_text(free)} is free on that disk; free some "
                   "space there, or write to another folder")


def require_space(path: str | Path, needed: int, what: str) -> None:
    """Raise `no_space` before writing `needed` bytes at `path` if they would not fit."""
    if shutil.disk_usage(Path(path).parent).free < needed:
        raise no_space(path, needed, what)


def ran_out_of_space(e: BaseException) -> bool:
    """Whether `e`, or an error it was raised from, is the disk filling up (ENOSPC, or a quota:
    EDQUOT). torch.save's writer reports it as `unexpected pos` from inline_container.cc."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return True
        if isinstance(e, RuntimeError) and "unexpected pos" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def remove_stale(folder: Path, pattern: str,
                 alive: Callable[[Path], bool] = lambda path: False) -> None:
    """Delete the files in `folder` matching `pattern` that a killed writer left behind, all
    but those for which `alive(path)` says their writer still runs."""
    for p in folder.glob(pattern):
        if not alive(p):
            p.unlink(missing_ok=True)


def write_temp(path: Path, write: Callable[[BinaryIO], object], what: str,
               size: Callable[[], int]) -> Path:
    """A temporary file beside `path` holding what `write(file)` wrote, flushed to the disk,
    for the caller to rename onto `path` (`os.replace` is atomic, so a crash leaves the old
    file or the new one, never half of one). Temporary files that killed writers left beside
    `path` are removed first; a full disk is said as such (`no_space`: about `size()` bytes
    of `what` needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{path.name}.*.tmp")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "xb") as f:  # as open() makes files: the umask applies (not mkstemp's)
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if ran_out_of_space(e):
            raise no_space(path, size(), what) from e
        raise
    return tmp


def check_output(path: str | Path, flag: str, suffixes: set[str] | None = None) -> None:
    """Check, before the work that ends by writing the file at `path` (the value of option
    `flag`), that it can be written: a file name (ending in one of `suffixes`, where given),
    not a folder; its folder made where missing, and writable. Raises a ValueError or OSError
    that names the path and the fix."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {shown(path)} is a folder; give the path of a file")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} {shown(path)} does not end in a file type such as "
                         f"{', '.join(sorted(suffixes))}, which says how to write it; e.g. "
                         f"{shown(path)}.png")
    above = next(p for p in path.parents if p.exists() or p == Path(p.anchor))
    if not above.is_dir():
        raise ValueError(f"{flag} {shown(path)}: {shown(above)} is a file, not a folder; choose "
                         "another path")
    probe = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        open(probe, "xb").close()
    except OSError as e:
        raise OSError(e.errno, f"cannot write {flag} {shown(path)} ({e.strerror}); choose "
                      "another path") from None
    probe.unlink()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    return True


@contextlib.contextmanager
def lock_folder(folder: Path) -> Iterator[None]:
    """Hold `folder/.lock` while a run writes there, so a second run started into the same
    folder is refused instead of replacing its checkpoint at every save. The lock is the
    operating system's (flock), so it goes with the process that held it, however that process
    ended: a killed run leaves nothing that blocks the next. Creating the folder and the lock
    file is also the test that the folder can be written, done before any training. Where
    there is no flock (Windows), the folder is only test-written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / ".lock", "a+")
    except OSError as e:
        raise OSError(e.errno, f"cannot write to the output folder {shown(folder)} "
                      f"({e.strerror}); choose another out_dir") from None
    with f:
        try:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise BlockingIOError(errno.EAGAIN, f"another run is writing to {shown(folder)} "
                                  f"({holder}); wait for it to finish, stop it, or choose "
                                  "another out_dir") from None
        except OSError as e:  # a file system without locks (NFS mounted nolock, some FUSE)
            warnings.warn(f"cannot lock {shown(folder)} ({e.strerror}): nothing stops a second "
                          "run from writing there at the same time", stacklevel=3)
        f.truncate(0)
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield


def download(url: str, path: str | Path, sha256: str, timeout: float = 30,
             progress: bool = True) -> Path:
    """Fetch `url` to `path` and check its SHA-256, as torch hub's `check_hash` does (but over
    the whole digest). The bytes go to a temporary file beside `path`, renamed only once they
    are complete and match, so an interrupted or corrupted download leaves nothing behind. A
    connection that fails, a short file or a wrong hash raises an OSError naming the URL and
    where to put the file by hand."""
    import hashlib
    import urllib.request

    from tqdm.auto import tqdm

    path = Path(path)
    by_hand = f"download {url} on a machine with internet and put it at {shown(path)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    digest, got = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            with tqdm(total=total or None, unit="B", unit_scale=True, disable=not progress,
                      desc=f"downloading {path.name}", leave=False) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if total and got != total:
            raise OSError(errno.EIO, f"the download of {url} stopped after {got} of {total} "
                          f"bytes; try again, or {by_hand}")
        if digest.hexdigest() != sha256:
            raise OSError(errno.EIO, f"{url} sent a file with SHA-256 {digest.hexdigest()}, not "
                          f"{sha256}: damaged on the way, or not the file meant; try again, or "
                          f"{by_hand}")
        os.replace(tmp, path)
    except OSError as e:  # urllib's URLError and timeouts are OSErrors too
        if e.errno == errno.EIO and not e.filename:
            raise
        raise OSError(errno.EIO, f"could not download {url} ({getattr(e, 'reason', e)}); "
                      f"{by_hand}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path
