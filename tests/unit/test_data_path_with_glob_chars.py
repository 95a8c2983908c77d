"""A local dataset path that exists is read as that file, even with glob metacharacters in its name
(it was once taken as a glob: refused, or silently swapped for another file the pattern matched). A data
file that is a broken link is an error, not a file left out."""

from __future__ import annotations

import pytest

from torchtitan_like.data.sources import LocalSource


def test_existing_file_with_brackets_in_its_name_is_read(tmp_path):
    path = tmp_path / "corpus[v1].jsonl"
    path.write_text('{"text": "hello"}\n', encoding="utf-8")
    assert path.is_file()
    # README: dataset_path is "a .txt/.jsonl/.json file, a directory or a glob"; this one is a file.
    assert list(LocalSource(str(path), "text").documents(0, 0)) == ["hello"]


def test_existing_file_with_brackets_is_not_swapped_for_another_file(tmp_path):
    wanted = tmp_path / "data[1].jsonl"
    wanted.write_text('{"text": "the file the user named"}\n', encoding="utf-8")
    (tmp_path / "data1.jsonl").write_text('{"text": "another file"}\n', encoding="utf-8")
    assert list(LocalSource(str(wanted), "text").documents(0, 0)) == ["the file the user named"]


@pytest.mark.parametrize("glob", [False, True])
def test_a_data_file_linked_from_a_missing_disk_is_an_error(tmp_path, glob):
    from torchtitan_like.errors import DataError

    (tmp_path / "a.jsonl").write_text('{"text": "here"}\n', encoding="utf-8")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "unmounted" / "b.jsonl")
    (tmp_path / "notes.md").symlink_to(tmp_path / "unmounted" / "notes.md")  # (not data: not checked)
    path = str(tmp_path / "*.jsonl") if glob else str(tmp_path)
    with pytest.raises(DataError, match=r"b\.jsonl is a link to .*unmounted/b\.jsonl, which does not exist"):
        LocalSource(path, "text")
