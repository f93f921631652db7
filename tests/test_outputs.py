"""`check_output`: a file the user asked for is checked before any work and never replaced without --overwrite;
`usual_mode`: written files get the permissions of a plain open()."""

from __future__ import annotations

import os
import stat

import pytest

from vitforge.errors import VitforgeError
from vitforge.outputs import check_output, usual_mode


def test_new_file_in_missing_folders_is_fine_and_nothing_is_created(tmp_path):
    target = tmp_path / "a" / "b" / "preds.csv"
    assert check_output(target) == target
    assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []  # the write probe leaves nothing behind


def test_existing_file_needs_overwrite(tmp_path):
    f = tmp_path / "preds.csv"
    f.write_text("keep me")
    with pytest.raises(VitforgeError, match=f"^--out {f} already exists; pass --overwrite to replace it$"):
        check_output(f)
    assert check_output(f, overwrite=True) == f and f.read_text() == "keep me"


def test_a_directory_is_refused_with_the_option_name(tmp_path):
    with pytest.raises(VitforgeError, match=f"^--report {tmp_path}: is a directory; give a file name$"):
        check_output(tmp_path, option="--report", overwrite=True)


def test_a_file_in_the_way_of_the_folder_is_refused(tmp_path):
    (tmp_path / "plain").write_text("")
    with pytest.raises(VitforgeError, match=r"^--out .*plain/x\.csv: cannot write in .*plain \("):
        check_output(tmp_path / "plain" / "x.csv")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(VitforgeError, match=r"cannot write in .*ro \(Permission denied\)$"):
            check_output(ro / "sub" / "x.csv")
    finally:
        ro.chmod(0o755)


def test_user_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_output("~/out.csv") == tmp_path / "out.csv"


def test_usual_mode_applies_the_umask(tmp_path):
    f = tmp_path / "f"
    f.write_text("")
    f.chmod(0o600)
    old = os.umask(0o027)
    try:
        usual_mode(f)
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
