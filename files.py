"""Writing a file or a directory atomically, the one way every stage writes its outputs.

The content is written under a temporary sibling name and renamed onto the real one when complete,
so a crash or an error never leaves a partial output under the real name: only the temporary,
which an error removes (and a later write of the same path removes, when a kill left it behind).
The output gets the permissions a plain open or mkdir would give under the umask, whatever created
it (mkdtemp, mkstemp and safetensors create theirs private).
"""

import os
import shutil
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
