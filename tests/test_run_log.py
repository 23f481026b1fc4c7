"""``output.log``: written atomically like every other artifact, continued across stages."""
import os

import pytest

from utils.run_log import RunLog


def test_every_line_leaves_a_complete_log_and_an_existing_log_is_continued(tmp_path):
    (tmp_path / "output.log").write_text("# stage 2\nlast line without newline")
    log = RunLog(str(tmp_path))
    log("# stage 3")
    assert (tmp_path / "output.log").read_text() == "# stage 2\nlast line without newline\n# stage 3\n"
    log("row 1")
    log.close()
    assert (tmp_path / "output.log").read_text().endswith("# stage 3\nrow 1\n")
    assert sorted(os.listdir(tmp_path)) == ["output.log"]  # no temporary file left behind


def test_an_interrupted_write_keeps_the_previous_log(tmp_path, monkeypatch):
    log = RunLog(str(tmp_path))
    log("first")

    def interrupted(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)  # the rename of the atomic write
    with pytest.raises(KeyboardInterrupt):
        log("second")
    monkeypatch.undo()
    assert (tmp_path / "output.log").read_text() == "first\n"
    assert sorted(os.listdir(tmp_path)) == ["output.log"]
