import hashlib

import torch

from latentct.util.io import atomic_torch_save


def test_equal_objects_saved_to_different_files_have_equal_bytes(tmp_path):
    """A file's sha256 names a generator in machine records and directions files: equal weights, equal hash (torch
    names the archive after the file it is given, which for an atomic write was a temporary name)."""
    state = {"weight": torch.arange(12.0).reshape(3, 4), "step": 7}
    atomic_torch_save(state, tmp_path / "a.pt")
    (tmp_path / "b").mkdir()
    atomic_torch_save(state, tmp_path / "b" / "generator.pt")
    first, second = ((tmp_path / name).read_bytes() for name in ("a.pt", "b/generator.pt"))
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()
    loaded = torch.load(tmp_path / "b" / "generator.pt", weights_only=True)
    assert torch.equal(loaded["weight"], state["weight"]) and loaded["step"] == 7
    assert not list(tmp_path.glob("**/.*"))  # no temporary file left
