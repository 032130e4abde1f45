"""loraserve.digest: the sha256 digest of an adapter directory (ModelVersion spec.adapter.digest)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from loraserve.api.modelversion import DIGEST_PATTERN
from loraserve.digest import CHUNK, directory_digest


def spec_digest(files: list[tuple[str, bytes]]) -> str:
    """The rule written out: per file, sorted by path: path + NUL + size + NUL + content."""
    h = hashlib.sha256()
    for path, content in sorted(files, key=lambda f: f[0].encode()):
        h.update(path.encode() + b"\0" + str(len(content)).encode() + b"\0" + content)
    return "sha256:" + h.hexdigest()


def make(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


ADAPTER = {
    "adapter_config.json": b'{"peft_type": "LORA", "r": 8}',
    "adapter_model.safetensors": bytes(range(256)) * 3,
    "sub/dir/notes.txt": b"hello\n",
}


def test_follows_the_written_rule(tmp_path: Path) -> None:
    root = make(tmp_path / "a", ADAPTER)
    assert directory_digest(root) == spec_digest(list(ADAPTER.items()))


def test_known_value(tmp_path: Path) -> None:
    root = make(tmp_path / "a", {"a.txt": b"hello", "b/c.bin": b"\x00\x01"})
    # sha256(b"a.txt\x005\x00hello" b"b/c.bin\x002\x00\x00\x01"), pinned so the rule cannot drift.
    assert directory_digest(root) == "sha256:c1d2a6a21834f41d08e8a5781f3f357ae1c09eed467a1de559a77ec8e0547b15"


def test_format_matches_the_crd_pattern(tmp_path: Path) -> None:
    digest = directory_digest(make(tmp_path / "a", ADAPTER))
    assert re.fullmatch(DIGEST_PATTERN, digest)


def test_str_path_and_path_agree(tmp_path: Path) -> None:
    root = make(tmp_path / "a", ADAPTER)
    assert directory_digest(str(root)) == directory_digest(root)


def test_independent_of_location_and_creation_order(tmp_path: Path) -> None:
    one = make(tmp_path / "one", ADAPTER)
    two = make(tmp_path / "elsewhere" / "two", dict(reversed(list(ADAPTER.items()))))
    assert directory_digest(one) == directory_digest(two)


@pytest.mark.parametrize(
    "change",
    [
        {"adapter_config.json": b'{"peft_type": "LORA", "r": 16}'},  # content
        {"extra.bin": b""},  # an added (even empty) file
        {"adapter_config.json": b'{"peft_type": "LORA", "r": 8} '},  # size
    ],
)
def test_any_change_changes_it(tmp_path: Path, change: dict[str, bytes]) -> None:
    before = directory_digest(make(tmp_path / "a", ADAPTER))
    after = directory_digest(make(tmp_path / "b", {**ADAPTER, **change}))
    assert before != after


def test_rename_changes_it(tmp_path: Path) -> None:
    a = make(tmp_path / "a", {"x.bin": b"data"})
    b = make(tmp_path / "b", {"y.bin": b"data"})
    assert directory_digest(a) != directory_digest(b)


def test_bytes_moved_between_files_change_it(tmp_path: Path) -> None:
    # Without the sizes, "ab" + "" and "a" + "b" would hash the same stream.
    a = make(tmp_path / "a", {"1": b"ab", "2": b""})
    b = make(tmp_path / "b", {"1": b"a", "2": b"b"})
    assert directory_digest(a) != directory_digest(b)


def test_sorted_by_posix_path_bytes_not_walk_order(tmp_path: Path) -> None:
    files = {"b": b"1", "a/z": b"2", "a.txt": b"3", "A": b"4", "a/b/c": b"5"}
    root = make(tmp_path / "a", files)
    assert directory_digest(root) == spec_digest(list(files.items()))


def test_single_file_is_hashed_under_its_name(tmp_path: Path) -> None:
    root = make(tmp_path / "a", {"adapter_model.safetensors": b"weights"})
    single = root / "adapter_model.safetensors"
    assert directory_digest(single) == spec_digest([("adapter_model.safetensors", b"weights")])
    assert directory_digest(single) == directory_digest(root)


def test_large_file_read_in_chunks(tmp_path: Path) -> None:
    content = os.urandom(CHUNK * 2 + 12345)
    root = make(tmp_path / "a", {"big.safetensors": content})
    assert directory_digest(root) == spec_digest([("big.safetensors", content)])


def test_hidden_entries_are_skipped(tmp_path: Path) -> None:
    plain = make(tmp_path / "plain", ADAPTER)
    downloaded = make(
        tmp_path / "downloaded",
        {
            **ADAPTER,
            ".cache/huggingface/download/adapter_model.safetensors.metadata": b"etag 123",
            ".gitattributes": b"*",
        },
    )
    assert directory_digest(plain) == directory_digest(downloaded)


def test_symlinks(tmp_path: Path) -> None:
    target = make(tmp_path / "store", {"weights": b"w"})
    root = make(tmp_path / "a", {"adapter_config.json": b"{}"})
    (root / "adapter_model.safetensors").symlink_to(target / "weights")  # followed: file links are content
    (root / "linked_dir").symlink_to(target, target_is_directory=True)  # not descended into
    assert directory_digest(root) == spec_digest([("adapter_config.json", b"{}"), ("adapter_model.safetensors", b"w")])


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(ValueError, match="no files"):
        directory_digest(tmp_path / "empty")


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        directory_digest(tmp_path / "nope")
