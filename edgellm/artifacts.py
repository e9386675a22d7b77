"""Content hashes, atomic writes and manifests: a killed run never leaves an artifact a rerun trusts.

A variant is built in a hidden staging folder `OUT/.<name>.partial`, its manifest is
written last, and the folder is renamed into place. A rerun trusts a variant only when
its manifest exists, its key matches, and the files it lists have the recorded sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"
WORK = "_work"  # OUT/_work: token ids and intermediates, shared by the variants of a run


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One hash over several files' names and contents, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success rename it over `path`, else delete it."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def staging_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


STAGING_MARKER = ".edgellm-staging"  # inside every staging folder edgellm makes
TEMP_FILE = re.compile(r"^\..+\.tmp-\d+$")  # temp_name's pattern


def fresh_staging_dir(final: Path) -> Path:
    """An empty staging folder for `final` holding edgellm's marker, clearing what a killed
    run left there (only a folder of the staging name that carries the marker)."""
    staging = staging_dir(final)
    if staging.is_symlink():
        staging.unlink()
    elif staging.exists():
        _remove_owned(staging)
    staging.mkdir(parents=True)
    try:
        (staging / STAGING_MARKER).write_text(str(os.getpid()))
    except BaseException:  # interrupted between the two: no folder without its marker
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _remove_owned(staging: Path) -> None:
    from edgellm.errors import UserError

    if not (staging / STAGING_MARKER).is_file():
        raise UserError(f"{staging} is in the way of edgellm's staging folder but edgellm did not "
                        "make it (no marker): move or remove it")
    shutil.rmtree(staging)


@contextmanager
def staged_dir(final: Path):
    """A fresh staging folder for `final`; removed when the block fails or is interrupted."""
    staging = fresh_staging_dir(final)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_dir(staging: Path, final: Path, key: str, record: dict) -> None:
    """Write the manifest (last), then move the staging folder into place. Hashing a large
    artifact takes seconds: interrupted or failing before the move, the staging folder is
    removed; killed outright (SIGKILL), it still holds its marker, so the next run clears
    it. The marker leaves only once the folder is in place (it is never listed)."""
    try:
        files = {
            str(p.relative_to(staging)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(staging.rglob("*")) if p.is_file() and p.name != STAGING_MARKER
        }
        write_json_atomic(staging / MANIFEST, {"key": key, "files": files, **record})
        check_replaceable(final)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (final / STAGING_MARKER).unlink(missing_ok=True)


def check_replaceable(final: Path) -> None:
    """edgellm replaces a folder only where it published one (its manifest is there): a
    symlink, a file or a folder of someone else's in the way is an error naming it."""
    from edgellm.errors import UserError

    if final.is_symlink():
        raise UserError(f"{final} is a symlink: edgellm never writes through one; remove it or "
                        "choose another --out")
    if final.exists() and not (final.is_dir() and (final / MANIFEST).is_file()):
        raise UserError(f"{final} is in the way and edgellm did not make it (no manifest): move "
                        "or remove it, or choose another --out")


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or damaged."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_manifest(folder: Path) -> dict | None:
    return read_json(folder / MANIFEST)


def trusted(folder: Path, key: str) -> bool:
    """True when `folder` holds a complete artifact built for `key`: its manifest matches
    and every file it lists has the recorded size and content hash."""
    manifest = read_manifest(folder)
    if not manifest or manifest.get("key") != key:
        return False
    for name, recorded in manifest.get("files", {}).items():
        path = folder / name
        if not isinstance(recorded, dict) or not path.is_file():
            return False
        if path.stat().st_size != recorded.get("size"):
            return False
        if sha256_file(path) != recorded.get("sha256"):
            return False
    return True


def clear_leftovers(out: Path) -> list[Path]:
    """Remove what killed runs left under `out`: staging folders (`.<name>.partial` holding
    edgellm's marker) and temporary files (`.<name>.tmp-<pid>`). Call it only while holding
    the folder's lock, when no other run can be writing them. Only edgellm's own places are
    searched: `out` itself, everything under `_work/`, and folders edgellm published (a
    manifest); never a folder holding another run's lock, never through a symlink. A
    leftover that is a symlink is unlinked, never followed. Returns what it removed."""
    removed: list[Path] = []
    _clear_in(Path(out), removed, top=True)
    return removed


def _clear_in(folder: Path, removed: list[Path], top: bool = False) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_symlink():
            if path.name.endswith(".partial") or TEMP_FILE.match(path.name):
                path.unlink()
                removed.append(path)
        elif path.is_dir():
            if path.name.endswith(".partial") and path.name.startswith("."):
                if (path / STAGING_MARKER).is_file():
                    shutil.rmtree(path)
                    removed.append(path)
            elif _ours(path, top):
                _clear_in(path, removed)
        elif TEMP_FILE.match(path.name):
            path.unlink()
            removed.append(path)


def _ours(folder: Path, top: bool) -> bool:
    """A folder edgellm searches for leftovers: everything under its work folder, and the
    folders it published (a manifest); never another run's output folder (its own lock)."""
    if os.path.lexists(folder / LOCK):
        return False
    return not top or folder.name == WORK or (folder / MANIFEST).is_file()


def dir_size(folder: Path, suffixes: tuple[str, ...] | None = None) -> int:
    return sum(
        p.stat().st_size for p in folder.rglob("*")
        if p.is_file() and (suffixes is None or p.suffix in suffixes)
    )


LOCK = ".edgellm.lock"
_held_locks: dict[Path, object] = {}  # output folders this process holds, kept open until exit


def lock_out_dir(out: Path) -> None:
    """Hold an exclusive lock on an output folder for the rest of this process, so two runs
    never interleave writes in it; a second process is refused at once with the holder's
    pid. The lock is the OS's (flock): it goes away with the process, even on SIGKILL, so a
    lock file a dead run left behind is simply taken over. The lock file is opened without
    following a symlink; one that is a symlink, a folder or any other non-regular file (or
    a hard link to another file) is refused, never followed or overwritten."""
    key = Path(out).resolve()
    if key in _held_locks:
        return
    handle = _take_lock(Path(out), key)
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _held_locks[key] = handle


def check_lock(out: Path) -> None:
    """Before any work: refuse an output folder whose lock file is not a regular file, or
    that another run holds (lock_out_dir takes the lock for good later)."""
    key = Path(out).resolve()
    if key in _held_locks or not os.path.lexists(key / LOCK):
        return
    _take_lock(Path(out), key).close()  # closing lets go of this check's own lock only


def _take_lock(out: Path, key: Path):
    """The open lock file of `out`, flock-ed by this process; a run holding it is refused."""
    import fcntl

    handle = os.fdopen(_open_lock_file(out, key / LOCK), "r+")  # noqa: SIM115
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read(64).strip() or "unknown"
        handle.close()
        from edgellm.errors import UserError

        raise UserError(f"output folder {out} is in use by another edgellm run (pid {holder}): "
                        "wait for it to finish or choose another --out") from None
    return handle


def _open_lock_file(out: Path, path: Path) -> int:
    """A read-write descriptor of the regular file `path`, created when missing. O_NOFOLLOW
    refuses a symlink (even a dangling one, which O_CREAT alone would follow and create),
    O_NONBLOCK keeps a FIFO or device from blocking the open; what opened is then checked
    with fstat, so nothing but a plain file of its own is ever written."""
    import errno
    import stat

    from edgellm.errors import UserError

    shown = out / LOCK

    def refuse(what: str) -> UserError:
        return UserError(f"lock file {shown} is {what}; edgellm locks only a regular file "
                         "of its own, never following or overwriting anything else: remove "
                         "it or choose another --out")

    try:
        before = os.lstat(path)
    except FileNotFoundError:
        before = None
    if before is not None and not stat.S_ISREG(before.st_mode):  # never open a device
        raise refuse(_file_kind(before.st_mode))
    flags = (os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
             | os.O_CLOEXEC)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # a symlink swapped in since lstat
            raise refuse("a symlink") from None
        if exc.errno == errno.EISDIR:
            raise refuse("a folder") from None
        raise UserError(f"cannot open lock file {shown} ({exc.strerror}): "
                        "choose a writable --out") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise refuse(_file_kind(info.st_mode) if not stat.S_ISREG(info.st_mode)
                     else "a hard link to another file")
    return fd


def _file_kind(mode: int) -> str:
    import stat

    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"
