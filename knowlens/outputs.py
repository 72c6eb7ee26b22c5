"""Output paths: checked before any work starts, written under a temporary name and renamed into place.

Every file knowlens writes gets the same permissions (``0666`` less the umask, as ``open`` would give),
whether it went through a temporary file or not, and a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from knowlens.errors import KnowlensError


def file_mode() -> int:
    """``0o666`` less the process umask: the mode a plain ``open(path, "w")`` would create."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_writable_dir(folder: Path, *, flag: str, target: Path) -> None:
    """``folder`` exists, is a folder, and a file can be created in it (tried, not guessed: root ignores modes)."""
    if not folder.exists():
        raise KnowlensError(f"{flag} {target}: folder {folder} does not exist")
    if not folder.is_dir():
        raise KnowlensError(f"{flag} {target}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".knowlens-write-test-", dir=folder)
    except OSError as err:
        raise KnowlensError(f"{flag} {target}: cannot write in {folder} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | os.PathLike[str], *, flag: str = "--out", overwrite: bool = False) -> Path:
    """A file to be written: not a folder, absent unless ``overwrite``, in an existing writable folder."""
    path = Path(path)
    if path.is_dir():
        raise KnowlensError(f"{flag} {path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise KnowlensError(f"{flag} {path}: exists; pass --overwrite to replace it")
    check_writable_dir(path.parent if str(path.parent) else Path("."), flag=flag, target=path)
    return path


def check_output_dir(
    path: str | os.PathLike[str],
    *,
    flag: str = "--out",
    overwrite: bool = False,
    owned: tuple[str, ...] = (),
) -> Path:
    """A folder to be written: a folder or absent (its parent existing and writable).

    ``owned`` are the file names (glob patterns) the verb writes there; if any exists, ``overwrite`` is needed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KnowlensError(f"{flag} {path}: exists and is not a folder")
    if path.is_dir():
        check_writable_dir(path, flag=flag, target=path)
        present = sorted({p.name for pattern in owned for p in path.glob(pattern)})
        if present and not overwrite:
            raise KnowlensError(f"{flag} {path}: already holds {', '.join(present[:3])}; pass --overwrite to replace")
    else:
        check_writable_dir(path.parent if str(path.parent) else Path("."), flag=flag, target=path)
    return path


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it to ``path`` (creating its folder).

    On any failure the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def removed_on_failure(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Create ``folder`` if absent; if the block raises, remove it again when this call created it."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(exist_ok=True)
    try:
        yield folder
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
