"""What the scoring tools (wer.py and compare_table.py) read and write: the error they report
with exit status 2, regular-file checks, and outputs written aside and renamed, all or none, never
over an existing file without --overwrite."""

import os
from contextlib import ExitStack
from pathlib import Path

import files
from files import NotRegularFile, atomic_write, directory_problem, regular_file

NORMALIZERS = ("whisper", "none")  # the text normalisers a WER report can be scored with


class InputError(Exception):
    """Bad input, reported to the user with exit status 2."""


def readable(path: Path) -> Path:
    """`path`, refused unless a regular file: reading a FIFO would wait for a writer forever."""
    try:
        return regular_file(path)
    except NotRegularFile as error:
        raise InputError(str(error)) from None


def check_output(path: Path, directory: bool) -> None:
    """Refuses, before any work, an --out that cannot be written: a file where a directory is meant
    or the reverse, or a path below something that is not a directory."""
    if directory:
        problem = directory_problem(path)
    elif path.is_dir():
        problem = f"{path} is a directory, where the report file is expected"
    else:
        problem = directory_problem(path.parent)
    if problem:
        raise InputError(f"--out: {problem}")


def check_overwrite(paths: list[Path], overwrite: bool) -> None:
    """Outputs are replaced only with --overwrite, and a directory in an output's place never
    (it would fail the last rename, after the others)."""
    directories = [path for path in paths if path.is_dir()]
    if directories:
        raise InputError(f"{directories[0]} is a directory, where an output file goes")
    existing = [str(path) for path in paths if os.path.lexists(path)]
    if existing and not overwrite:
        raise InputError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")


def write_into(directory: Path, contents: dict[Path, bytes]) -> None:
    """Writes every output into `directory` (made if missing), or none: each under a temporary name,
    all renamed once all are written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            temporaries = {path: stack.enter_context(atomic_write(path)) for path in contents}
            for path, data in contents.items():
                temporaries[path].write_bytes(data)
    except OSError as error:
        raise InputError(f"cannot write into {directory} ({error.strerror or error})") from None

def read_json_object(path: Path) -> dict:
    try:
        return files.read_json(path)
    except files.JsonFileError as error:
        raise InputError(str(error)) from None
