"""files.atomic_write, the one way outputs are written; files.regular_file and its kin, the checks before a read
or a write into a directory."""

import hashlib
import os
import stat

import pytest

from files import (JsonFileError, NotRegularFile, atomic_write, directory_problem, file_sha256, read_json, regular_file,
                   regular_files_only, write_json)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_file_appears_complete_with_the_umask_permissions(tmp_path, umask_027):
    target = tmp_path / "out.json"
    with atomic_write(target) as tmp:
        tmp.write_text("partial")
        assert not target.exists()  # nothing under the real name until the end
        os.chmod(tmp, 0o600)  # as mkstemp and safetensors create files
    assert target.read_text() == "partial" and mode(target) == 0o640
    assert os.listdir(tmp_path) == ["out.json"]


def test_a_failure_leaves_the_old_output_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("new")
        raise RuntimeError("cut short")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_directories_replace_or_refuse_and_leftovers_of_a_kill_are_removed(tmp_path, umask_027):
    target = tmp_path / "step_1"
    (tmp_path / ".tmp-step_1").mkdir()  # what a killed write left
    (tmp_path / ".tmp-step_1" / "stale").write_text("")
    with atomic_write(target, directory=True) as tmp:
        (tmp / "a").write_text("1")
    assert os.listdir(target) == ["a"] and mode(target) == 0o750
    with atomic_write(target, directory=True) as tmp:  # replace (the default)
        (tmp / "b").write_text("2")
    assert os.listdir(target) == ["b"]
    with pytest.raises(FileExistsError), atomic_write(target, directory=True, replace=False) as tmp:
        (tmp / "c").write_text("3")
    assert os.listdir(target) == ["b"] and sorted(os.listdir(tmp_path)) == ["step_1"]


def test_regular_file_refuses_what_would_block_or_loop(tmp_path):
    plain = tmp_path / "rows.jsonl"
    plain.write_text("{}\n")
    (tmp_path / "link").symlink_to(plain)
    assert regular_file(tmp_path / "link") == tmp_path / "link"
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for name, what in [("fifo", "a FIFO"), ("loop", "cannot be read"), ("missing", "no such file"), (".", "a directory")]:
        with pytest.raises(NotRegularFile, match=what):
            regular_file(tmp_path / name)
    with pytest.raises(NotRegularFile, match="a device"):
        regular_file("/dev/zero")


def test_directory_problem_names_what_stands_where_a_directory_should(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "to_dir").symlink_to(tmp_path / "dir")
    os.mkfifo(tmp_path / "fifo")
    for name in ("dir", "to_dir", "new", "new/deeper", "dir/new"):
        assert directory_problem(tmp_path / name) is None, name
    assert directory_problem(tmp_path / "loop") == f"{tmp_path / 'loop'} is a symlink loop, where a directory is expected"
    assert directory_problem(tmp_path / "dangling").endswith("is a symlink to nothing, where a directory is expected")
    assert directory_problem(tmp_path / "fifo").endswith("is a FIFO, where a directory is expected")
    assert directory_problem(tmp_path / "file" / "run") == f"{tmp_path / 'file' / 'run'} cannot be created: " \
                                                         f"{tmp_path / 'file'} is a regular file"
    assert directory_problem(tmp_path / "loop" / "a" / "b").endswith(f"cannot be created: {tmp_path / 'loop'} is a "
                                                                     "symlink loop")


def test_regular_files_only_refuses_a_fifo_among_a_directory_s_files(tmp_path):
    (tmp_path / "original").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    regular_files_only(tmp_path, "original", "absent")
    os.mkfifo(tmp_path / "original" / "tokenizer.model")
    with pytest.raises(NotRegularFile, match=r"original/tokenizer\.model: is a FIFO"):
        regular_files_only(tmp_path, "original")
    regular_files_only(tmp_path)  # subdirectories are only looked into when named


def test_file_sha256_is_the_sha256_of_the_bytes_and_refuses_a_fifo(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "big").write_bytes(data)
    assert file_sha256(tmp_path / "big") == hashlib.sha256(data).hexdigest()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NotRegularFile, match="a FIFO"):
        file_sha256(tmp_path / "fifo")


def test_read_json_names_the_file_line_and_column_and_write_json_is_atomic(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": [1, 2]})
    assert read_json(path) == {"a": [1, 2]} and os.listdir(tmp_path) == ["x.json"]
    for text, problem in [('{\n "a": 1,\n}', r"x\.json:3:1: invalid JSON"), ("[1]", r"x\.json: expected a JSON object, got an array"),
                          (b"\xff", r"x\.json: not UTF-8 text"), ("[" * 100000, r"x\.json: invalid JSON \(nested too deeply\)")]:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(JsonFileError, match=problem):
            read_json(path)
    path.write_text("[1]")
    assert read_json(path, require_object=False) == [1]
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(JsonFileError, match="is a FIFO"):
        read_json(tmp_path / "fifo.json")
