"""Writing a file or a directory atomically, the one way every stage writes its outputs (`atomic_write`,
and `write_json` for a JSON file); reading a JSON file with errors that name it (`read_json`); and
checking that a path to be read is a regular file (`regular_file`, `regular_files_only`), so that no
stage blocks on a FIFO or a device, and that a directory to use is one (`directory_problem`), so that
a symlink loop is not read as an empty directory.

The content is written under a temporary sibling name and renamed onto the real one when complete,
so a crash or an error never leaves a partial output under the real name: only the temporary,
which an error removes (and a later write of the same path removes, when a kill left it behind).
The output gets the permissions a plain open or mkdir would give under the umask, whatever created
it (mkdtemp, mkstemp and safetensors create theirs private).
"""

import errno
import hashlib
import json
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


def write_json(path: str | os.PathLike, value, *, indent: int | None = 2) -> None:
    """`value` as a JSON file (with a final newline), written atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(value, indent=indent) + "\n", encoding="utf-8")


class JsonFileError(ValueError):
    """A JSON file that cannot be used: the message names the file, and the line and column of
    invalid JSON."""


def read_json(path: str | os.PathLike, *, require_object: bool = True):
    """The value a JSON file holds (an object, unless `require_object` is False). The path is checked
    to be a regular file first (reading a FIFO would block); any problem is a JsonFileError."""
    try:
        value = json.loads(regular_file(path).read_text(encoding="utf-8"))
    except NotRegularFile as error:
        raise JsonFileError(str(error)) from None
    except OSError as error:
        raise JsonFileError(f"{path}: cannot be read ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise JsonFileError(f"{path}: not UTF-8 text ({error.reason})") from None
    except json.JSONDecodeError as error:
        raise JsonFileError(f"{path}:{error.lineno}:{error.colno}: invalid JSON ({error.msg})") from None
    except RecursionError:
        raise JsonFileError(f"{path}: invalid JSON (nested too deeply)") from None
    if require_object and not isinstance(value, dict):
        raise JsonFileError(f"{path}: expected a JSON object, got {_json_kind(value)}")
    return value


def _json_kind(value) -> str:
    kinds = ((list, "an array"), (str, "a string"), (bool, "a boolean"), (int, "a number"), (float, "a number"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


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
        raise NotRegularFile(f"{path}: is {_kind(mode)}, where a regular file is expected")
    return path


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def _what(path: Path) -> str:
    """What an existing (or dangling) path that is not a directory is, in words."""
    try:
        return _kind(path.stat().st_mode)
    except FileNotFoundError:
        return "a symlink to nothing"
    except OSError as error:
        return "a symlink loop" if error.errno == errno.ELOOP else f"unusable ({error.strerror})"


def directory_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be used as a directory, or created as one: it, or the nearest of its parents
    that exists, is something else (a file, a FIFO, a symlink loop, a symlink to nothing); None
    when it is a directory or can be created. Path.is_dir() reads a symlink loop as absent."""
    path = Path(path)
    for nearest in (path, *path.parents):
        if not os.path.lexists(nearest):
            continue
        if nearest.is_dir():
            return None
        if nearest == path:
            return f"{path} is {_what(path)}, where a directory is expected"
        return f"{path} cannot be created: {nearest} is {_what(nearest)}"
    return None


def regular_files_only(directory: str | os.PathLike, *subdirectories: str) -> None:
    """Refuses (NotRegularFile) any entry of `directory` and of its `subdirectories` that is neither
    a directory nor a regular file, before a reader opens one of them: a model directory's weights
    are found by name or through an index, and opening a FIFO among them would block."""
    directory = Path(directory)
    for folder in (directory, *(directory / name for name in subdirectories)):
        if folder.is_dir():
            for entry in sorted(folder.iterdir()):
                if not entry.is_dir():
                    regular_file(entry)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a regular file's bytes, as `sha256sum` prints it."""
    digest = hashlib.sha256()
    with open(regular_file(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
