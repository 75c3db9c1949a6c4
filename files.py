"""Writing a file or a directory atomically, the one way every stage writes its outputs; and
checking that a path to be read is a regular file, so that no stage blocks on a FIFO or a device.

The content is written under a temporary sibling name and renamed onto the real one when complete,
so a crash or an error never leaves a partial output under the real name: only the temporary,
which an error removes (and a later write of the same path removes, when a kill left it behind).
The output gets the permissions a plain open or mkdir would give under the umask, whatever created
it (mkdtemp, mkstemp and safetensors create theirs private).
"""

import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | os.PathLike, *, directory: bool = False, replace: bool = True,
                 temporary: str | os.PathLike | None = None):
    """Yields the temporary path to write `path`'s content to (an empty directory when `directory`),
    then renames it onto `path`. An existing file is replaced; an existing directory only when
    `replace` (else FileExistsError, and the other copy stays). `temporary` names the temporary
    (default: `.tmp-<name>` beside `path`)."""
    path = Path(path)
    tmp = Path(temporary) if temporary is not None else path.with_name(f".tmp-{path.name}")
    _remove(tmp)  # left by a write that was killed
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        tmp.chmod((0o777 if directory else 0o666) & ~umask())
        if directory and path.exists():
            if not replace:
                raise FileExistsError(f"{path}: exists")
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class NotRegularFile(ValueError):
    """A path to be read as a file is missing, or is something else (a FIFO, a device, a directory,
    a symlink loop); the message names the path and what it is."""


def regular_file(path: str | os.PathLike) -> Path:
    """`path`, checked to be a regular file (through symlinks) before anything opens it: opening a
    FIFO for reading blocks until a writer comes, and a device may never end."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise NotRegularFile(f"{path}: no such file") from None
    except OSError as error:  # a symlink loop (ELOOP), a path through a file (ENOTDIR), no permission
        raise NotRegularFile(f"{path}: cannot be read ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise NotRegularFile(f"{path}: is {kind}, where a regular file is expected")
    return path
