"""Shaping GitHub's file entries into the stored `files_changed` list."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from flowlens_ingest.events.enums import FilesStatus
from flowlens_ingest.github.files import KEPT_FIELDS, MAX_FILES, FileList, shape

from .fake_github import make_files


def entry(name: str, patch: str | None = "@@ -1 +1 @@\n-a\n+b", **extra: Any) -> dict[str, Any]:
    """One GitHub-shaped file entry."""
    value: dict[str, Any] = {
        "sha": "0" * 40,
        "filename": name,
        "status": "modified",
        "additions": 1,
        "deletions": 1,
        "changes": 2,
        "blob_url": f"https://github.com/o/r/blob/x/{name}",
        "raw_url": f"https://github.com/o/r/raw/x/{name}",
        "contents_url": f"https://api.github.com/repos/o/r/contents/{name}",
    }
    if patch is not None:
        value["patch"] = patch
    value.update(extra)
    return value


def test_keeps_only_the_stored_fields_in_order() -> None:
    result = shape([entry("a.py"), entry("b.py", patch=None)], expected=2)
    assert result == FileList(
        files=[
            {
                "filename": "a.py",
                "status": "modified",
                "additions": 1,
                "deletions": 1,
                "changes": 2,
                "sha": "0" * 40,
                "patch": "@@ -1 +1 @@\n-a\n+b",
            },
            # A binary file: GitHub sends no patch, and that is not a truncation.
            {"filename": "b.py", "status": "modified", "additions": 1, "deletions": 1, "changes": 2, "sha": "0" * 40},
        ],
        status=FilesStatus.FETCHED,
    )
    assert all(set(f) <= set(KEPT_FIELDS) for f in result.files)


def test_previous_filename_is_kept_for_renames_only() -> None:
    renamed = entry("new/name.py", status="renamed", previous_filename="old/name.py")
    result = shape([renamed, entry("same.py")], expected=2)
    assert result.files[0]["previous_filename"] == "old/name.py"
    assert result.files[0]["status"] == "renamed"
    assert "previous_filename" not in result.files[1]


def test_a_patch_over_the_per_file_cap_is_cut_and_flagged() -> None:
    long_patch = "@@ -1 +1 @@\n" + "+x\n" * 100
    result = shape([entry("big.py", patch=long_patch), entry("small.py")], expected=2, max_patch_chars=50)
    big, small = result.files
    assert big["patch"] == long_patch[:50]
    assert big["patch_truncated"] is True
    assert big["additions"] == 1  # counts are GitHub's, untouched
    assert "patch_truncated" not in small
    assert result.status is FilesStatus.TRUNCATED


def test_patches_stop_once_the_per_pr_budget_is_spent() -> None:
    patches = ["a" * 40, "b" * 40, "c" * 40, "d" * 5]
    entries = [entry(f"f{i}.py", patch=p) for i, p in enumerate(patches)]
    result = shape(entries, expected=4, max_total_patch_chars=100)
    assert [f.get("patch") for f in result.files] == ["a" * 40, "b" * 40, None, None]
    assert [f.get("patch_truncated", False) for f in result.files] == [False, False, True, True]
    # Entries whose patch was dropped still carry their counts.
    assert all(f["changes"] == 2 for f in result.files)
    assert result.status is FilesStatus.TRUNCATED


def test_a_patch_exactly_at_the_caps_is_whole() -> None:
    result = shape([entry("a.py", patch="x" * 10)], expected=1, max_patch_chars=10, max_total_patch_chars=10)
    assert result.files[0]["patch"] == "x" * 10
    assert "patch_truncated" not in result.files[0]
    assert result.status is FilesStatus.FETCHED


def test_fewer_entries_than_the_pr_announces_is_truncated() -> None:
    assert shape([entry("a.py")], expected=2).status is FilesStatus.TRUNCATED
    assert shape([entry("a.py")], expected=1).status is FilesStatus.FETCHED
    assert shape([entry("a.py")], expected=None).status is FilesStatus.FETCHED
    assert shape([], expected=0) == FileList(files=[], status=FilesStatus.FETCHED)


def test_the_list_is_cut_at_githubs_cap() -> None:
    result = shape(make_files(MAX_FILES + 100), expected=MAX_FILES + 100)
    assert len(result.files) == MAX_FILES
    assert result.files[-1]["filename"] == f"src/f{MAX_FILES - 1:05d}.py"
    assert result.status is FilesStatus.TRUNCATED
    # Even when GitHub's count agrees, a list past the cap is cut.
    assert shape(make_files(MAX_FILES + 1), expected=None).status is FilesStatus.TRUNCATED
    assert shape(make_files(MAX_FILES), expected=MAX_FILES).status is FilesStatus.FETCHED


def test_a_list_cut_while_fetching_is_truncated_even_when_it_looks_whole() -> None:
    # The fetch stopped early (an answer cut at the byte cap): nothing in the entries shows it.
    entries = make_files(3)
    assert shape(entries, expected=None).status is FilesStatus.FETCHED
    assert shape(entries, expected=None, truncated=True) == FileList(
        files=shape(entries, expected=None).files, status=FilesStatus.TRUNCATED
    )
    assert shape([], expected=None, truncated=True) == FileList(files=[], status=FilesStatus.TRUNCATED)


def test_entries_that_are_not_files_are_ignored() -> None:
    junk: list[Any] = ["a.py", None, {"status": "added"}, {"filename": 3}, entry("ok.py")]
    result = shape(junk, expected=None)
    assert [f["filename"] for f in result.files] == ["ok.py"]


def test_shaping_is_deterministic_and_leaves_its_input_alone() -> None:
    entries = [*make_files(120), entry("huge.py", patch="y" * 5000)]
    before = copy.deepcopy(entries)
    first = shape(entries, expected=125, max_patch_chars=1000, max_total_patch_chars=4000)
    second = shape(copy.deepcopy(entries), expected=125, max_patch_chars=1000, max_total_patch_chars=4000)
    assert first == second
    assert entries == before
    assert first.status is FilesStatus.TRUNCATED


def test_status_values_are_the_column_values() -> None:
    assert [s.value for s in FilesStatus] == ["pending", "fetched", "truncated", "not_found", "forbidden", "failed"]
    assert FilesStatus("truncated") is FilesStatus.TRUNCATED
    assert f"{FilesStatus.NOT_FOUND}" == "not_found"


def test_negative_caps_are_refused() -> None:
    with pytest.raises(ValueError):
        shape([], expected=None, max_patch_chars=-1)
