"""Writes that a reader sees whole or not at all (`model/files.py`)."""
import pytest

from model.files import replace_folder, write_atomically


class Interrupted(Exception):
    pass


def test_a_file_is_replaced_whole_and_leaves_no_temporary_behind(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    write_atomically(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_write_killed_half_way_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")

    def half_then_killed(tmp):
        tmp.write_text("ne")
        raise Interrupted

    with pytest.raises(Interrupted):
        write_atomically(path, half_then_killed)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_folder_is_swapped_whole(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "stale.txt").write_text("from the old run")
    replace_folder(folder, lambda staging: (staging / "config.json").write_text("{}"))
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_folder_fill_killed_half_way_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("old")

    def config_then_killed(staging):
        (staging / "config.json").write_text("new")
        raise Interrupted

    with pytest.raises(Interrupted):
        replace_folder(folder, config_then_killed)
    assert (folder / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
