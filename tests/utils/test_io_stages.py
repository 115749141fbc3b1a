import os

import pytest

from dinoscale.utils.io import atomic_path, read_json, write_json
from dinoscale.utils.stages import is_done, mark_done, read_marker


def test_atomic_write_keeps_old_file_when_writer_dies(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert read_json(target) == {"v": 1}
    assert os.listdir(tmp_path) == ["out.json"]  # no temp file left behind


def test_stage_marker_matches_config(tmp_path):
    stage_dir = tmp_path / "dedup"
    assert not is_done(stage_dir, {"k": 64})
    mark_done(stage_dir, {"k": 64}, {"kept": 10}, 1.5)
    assert is_done(stage_dir, {"k": 64})
    assert not is_done(stage_dir, {"k": 32})  # another config redoes the stage
    marker = read_marker(stage_dir)
    assert marker["counts"] == {"kept": 10} and marker["seconds"] == 1.5
