"""File output that never leaves a half-written file behind: write to a temporary name, then rename."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path in the target's folder; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs should be like any other file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    """``obj`` as JSON; NaN and infinities are written as null (JSON has no NaN, and a bare NaN makes the file
    unreadable to every strict parser)."""
    atomic_write_text(path, json.dumps(_finite_or_null(obj), indent=2, sort_keys=False, default=str,
                                       allow_nan=False) + "\n")


def _finite_or_null(obj):
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` through an open file, so the same object saved twice gives the same bytes: given a path,
    torch names the archive's folder after the file, here the temporary one with its random suffix, and a machine
    record called one generator's weights two."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def staging_dir(final: Path) -> Path:
    """A fresh staging folder beside ``final``; staging folders left by killed runs (dead PIDs) are removed."""
    for old in final.parent.glob(f".{final.name}.staging-*"):
        try:
            os.kill(int(old.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process
    staging = final.with_name(f".{final.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def replace_dir(staging: Path, final: Path) -> None:
    """Move a finished staging folder into place; an old ``final`` is removed only after the move."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_HEADER_BYTES = 128  # fixed .npy v1.0 header size, so the final shape can be written in place


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
    body_len = _HEADER_BYTES - 10
    text = text.ljust(body_len - 1) + "\n"
    if len(text) != body_len:
        raise ValueError(f"npy header for shape {shape} does not fit in {_HEADER_BYTES} bytes")
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + text.encode("latin1")


class NpyAppender:
    """Stream (n, ...) blocks into a .npy file with constant memory; the row count is set on close.

    The result is an ordinary .npy that ``np.load(path, mmap_mode="r")`` opens.
    """

    def __init__(self, path: str | Path, item_shape: tuple, dtype=np.int16):
        self.path = Path(path)
        self.item_shape = tuple(item_shape)
        self.dtype = np.dtype(dtype)
        self.count = 0
        self._file = open(self.path, "wb")
        self._file.write(_npy_header(self.dtype, (0, *self.item_shape)))

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.item_shape:
            raise ValueError(f"{self.path}: block of shape {block.shape[1:]} where {self.item_shape} was expected")
        self._file.write(block.tobytes())
        self.count += block.shape[0]

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, (self.count, *self.item_shape)))
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

