"""The DCP metadata unpickler: what torch pickles on every Python 3.10-3.12 is read, code is refused."""

import io
import pathlib
import pickle
from enum import Enum

import pytest
import torch
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

from hld.train.checkpoint import _stored_keys


class _Py3112Pickler(pickle.Pickler):
    """Pickles an enum member the way Python 3.11.2's enum.py does: `getattr(EnumClass, "NAME")`."""

    def reducer_override(self, obj):
        if isinstance(obj, Enum):
            return getattr, (type(obj), obj.name)
        return NotImplemented


def _metadata() -> Metadata:
    props = TensorProperties.create_from_tensor(torch.zeros(2, 3))
    chunk = ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 3]))
    md = TensorStorageMetadata(properties=props, size=torch.Size([2, 3]), chunks=[chunk])
    return Metadata(state_dict_metadata={"model.w": md, "optim.w.step": md})


def _write(tmp_path, data: bytes):
    (tmp_path / ".metadata").write_bytes(data)
    return tmp_path


def _dumps_3112(obj) -> bytes:
    buf = io.BytesIO()
    _Py3112Pickler(buf).dump(obj)
    return buf.getvalue()


def test_metadata_written_by_python_3_11_2_is_read(tmp_path):
    data = _dumps_3112(_metadata())
    assert b"getattr" in data  # the crafted pickle names builtins.getattr, as 3.11.2's does
    assert _stored_keys(_write(tmp_path, data)) == {"model.w", "optim.w.step"}


def test_metadata_written_by_this_python_is_read(tmp_path):
    assert _stored_keys(_write(tmp_path, pickle.dumps(_metadata()))) == {"model.w", "optim.w.step"}


class _Getattr:
    """Pickles as `getattr(target, name)()`-style payloads: getattr reached through the REDUCE opcode."""

    def __init__(self, target, name):
        self.target, self.name = target, name

    def __reduce__(self):
        return getattr, (self.target, self.name)


@pytest.mark.parametrize(
    "target,name",
    [
        (pathlib.PosixPath, "unlink"),  # an admitted class, not an enum
        (TensorProperties, "create_from_tensor"),  # an admitted dataclass, not an enum
        (_MEM_FORMAT_ENCODING, "_missing_"),  # a DCP enum, but not one of its members
        (_MEM_FORMAT_ENCODING, "__class__"),
    ],
)
def test_getattr_reaching_anything_but_an_enum_member_is_refused(tmp_path, target, name):
    for payload in (_Getattr(target, name), {"x": [_Getattr(target, name)]}):
        assert _stored_keys(_write(tmp_path, pickle.dumps(payload))) is None


def test_getattr_of_a_module_is_refused(tmp_path):
    # builtins.getattr(os, "system"): a module cannot be pickled, so the bytes are written by hand
    data = b"cbuiltins\ngetattr\n(cos\nsystem\nS'system'\ntR."
    assert _stored_keys(_write(tmp_path, data)) is None
