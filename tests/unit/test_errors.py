"""A full disk is recognised whatever library meets it: errno, wrapped types, Rust's wording, causes."""

from __future__ import annotations

import errno

from lmtune.errors import storage_failure


class SafetensorError(Exception):  # the shape of safetensors' own exception type: a message, no errno
    pass


def test_full_disk_is_recognised_through_wrappers_and_causes():
    assert storage_failure(OSError(errno.ENOSPC, "No space left on device")) == "the disk is full"
    assert storage_failure(OSError(errno.EDQUOT, "Disk quota exceeded")) == "the disk quota is exceeded"
    assert storage_failure(OSError(errno.EROFS, "Read-only file system")) == "the file system is read-only"
    assert storage_failure(SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                           "message: \"No space left on device\" })")) == "the disk is full"
    assert storage_failure(Exception("failed to write (os error 28)")) == "the disk is full"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed") from inner
    except RuntimeError as outer:
        assert storage_failure(outer) == "the disk is full"
    assert storage_failure(OSError(errno.ENOENT, "No such file")) is None
    assert storage_failure(ValueError("bad value")) is None
    looped = ValueError("a")
    looped.__context__ = looped
    assert storage_failure(looped) is None


def test_a_write_error_without_the_os_words_counts_as_a_full_disk_only_where_no_room_is_left(tmp_path):
    """torch.save's writer says "iostream error" / "unexpected pos" on a full disk (tests/slow/test_full_disk.py
    fills a real tmpfs); on a file system with room the same error is not blamed on the disk."""
    from lmtune.errors import NEARLY_FULL_BYTES, free_bytes

    assert free_bytes(tmp_path / "not" / "yet" / "made") > NEARLY_FULL_BYTES  # its nearest existing parent
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7176576 vs 7176468")
    assert storage_failure(error, written_to=tmp_path) is None
    assert storage_failure(ValueError("not a write"), written_to=tmp_path) is None
