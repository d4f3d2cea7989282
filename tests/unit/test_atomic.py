"""hld.atomic: a file or a directory is the old one or the complete new one, never a part, and a
failed write leaves no temporary file or directory behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hld import atomic
from hld.train.checkpoint import atomic_save


def _debris(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_write_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "a.txt"
    atomic.write_text(path, "old")

    def torn(fh):
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic.write_file(path, torn)
    assert path.read_text() == "old" and _debris(tmp_path) == []
    atomic.write_json(path, {"x": "é"})
    assert path.read_text(encoding="utf-8") == '{\n  "x": "\\u00e9"\n}'


def test_numpy_and_torch_through_the_one_writer(tmp_path):
    a = np.arange(7, dtype=np.int32)
    atomic.write_file(tmp_path / "s.npy", lambda fh: np.save(fh, a))  # np.save adds no second suffix
    assert np.array_equal(np.load(tmp_path / "s.npy"), a)
    atomic_save({"w": torch.ones(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "s.npy"]


def test_new_dir_keeps_the_old_directory_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "conv"
    with atomic.new_dir(final) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(RuntimeError), atomic.new_dir(final) as tmp:
        (tmp / "f").write_text("2")
        raise RuntimeError("the conversion failed")
    assert (final / "f").read_text() == "1" and _debris(tmp_path) == []  # old kept, no temporary left
    with atomic.new_dir(final) as tmp:
        (tmp / "g").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["g"] and _debris(tmp_path) == []
