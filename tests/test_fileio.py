"""Atomic writes: a refused or failed write leaves what was on disk as it was, with no temporary file behind."""

import os

import pytest

from concept_express.uce_core.errors import ConceptExpressError
from concept_express.uce_core.fileio import write_atomic, write_text_atomic


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_no_overwrite_refuses_an_existing_file_and_keeps_it(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("first")
    with pytest.raises(ConceptExpressError, match="already exists.*--overwrite"):
        write_text_atomic(target, "second", overwrite=False)
    assert target.read_text() == "first" and _listing(tmp_path) == ["a.txt"]
    write_text_atomic(target, "second")
    assert target.read_text() == "second" and _listing(tmp_path) == ["a.txt"]


def test_a_writer_that_fails_leaves_nothing_behind(tmp_path):
    target = tmp_path / "b.bin"
    target.write_bytes(b"old")

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, broken)
    assert target.read_bytes() == b"old" and _listing(tmp_path) == ["b.bin"]


@pytest.mark.parametrize("error", [PermissionError, OSError])
def test_without_hard_links_the_no_overwrite_path_still_works(tmp_path, monkeypatch, error):
    def no_links(src, dst):  # FAT, exFAT and some network shares
        raise error(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "c.txt"
    write_text_atomic(target, "new", overwrite=False)
    assert target.read_text() == "new" and _listing(tmp_path) == ["c.txt"]
    with pytest.raises(ConceptExpressError, match="already exists"):
        write_text_atomic(target, "again", overwrite=False)
    assert target.read_text() == "new" and _listing(tmp_path) == ["c.txt"]
