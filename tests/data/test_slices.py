import math

import numpy as np
import pytest
import torch

from latentct.data.slices import CTSlices, hu_to_unit, parse_window, random_affine, unit_to_hu
from latentct.util.settings import UserError


def test_windows_map_hu_to_unit_range_and_back():
    hu = torch.tensor([-2000.0, -1000.0, 500.0, 2000.0, 3000.0])
    assert hu_to_unit(hu, "default").tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]
    assert hu_to_unit(torch.tensor([-1000.0, -300.0, 400.0]), "lung").tolist() == [-1.0, 0.0, 1.0]
    assert parse_window("-160,240") == (-160.0, 240.0)
    x = torch.linspace(-1, 1, 7)
    assert torch.allclose(hu_to_unit(unit_to_hu(x, "lung"), "lung"), x, atol=1e-6)
    with pytest.raises(UserError, match="--window"):
        parse_window("bone")
    with pytest.raises(UserError, match="must exceed"):
        parse_window("400,-1000")


def test_dataset_reads_windowed_slices_and_labels(dataset):
    raw = np.load(dataset / "train.npy")
    ds = CTSlices(dataset, "train", window="default", labels=["z_position", "rotation"])
    image, target = ds[3]
    assert len(ds) == raw.shape[0] and image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert torch.allclose(image, hu_to_unit(torch.from_numpy(raw[3].astype(np.float32)), "default"))
    assert target.shape == (2,) and 0 <= target[0] <= 1
    plain = CTSlices(dataset, "test")[0]
    assert isinstance(plain, torch.Tensor) and plain.min() >= -1 and plain.max() <= 1
    with pytest.raises(UserError, match="no column"):
        CTSlices(dataset, "train", labels=["heart_rate"])


def test_dataset_in_dataloader_workers(dataset):
    ds = CTSlices(dataset, "train")
    ds[0]  # opens the map in this process; workers must open their own
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
    batches = list(loader)
    assert sum(b.shape[0] for b in batches) == len(ds)
    assert torch.equal(batches[0][1], ds[1])


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="run preprocess.py first"):
        CTSlices(tmp_path)


def test_random_affine_identity_rotation_and_fill():
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    same = random_affine(x, max_rotation_deg=0.0, scale_range=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    # a 90 degree bound with a fixed seed rotates content; zoom >1 pulls from inside, so no fill
    square = -torch.ones(1, 1, 32, 32)
    square[..., 4:28, 12:20] = 1.0
    gen = torch.Generator().manual_seed(0)
    turned = random_affine(square.repeat(8, 1, 1, 1), 90.0, (1.0, 1.0), generator=gen)
    assert (turned - square).abs().amax(dim=(1, 2, 3)).max() > 1.0
    # shrinking the image (scale < 1) brings in air from outside, which must be -1
    small = random_affine(torch.ones(2, 1, 32, 32), 0.0, (0.5, 0.5))
    assert small[0, 0, 0, 0] == pytest.approx(-1.0) and small[0, 0, 16, 16] == pytest.approx(1.0)
    # the original's bounds: +-1 degree and zoom 1..1.1 move an image only slightly
    mild = random_affine(x, 1.0, (1.0, 1.1), generator=gen)
    assert mild.shape == x.shape and math.isfinite(mild.sum().item())


def test_evaluations_use_the_test_split_or_else_the_train_split(phantom_tree, tmp_path):
    import preprocess
    from latentct.data.slices import held_out, is_dataset

    assert held_out(None, "default") is None and not is_dataset(tmp_path)
    both = preprocess.main(preprocess.Settings(input=str(phantom_tree), output=str(tmp_path / "both"), size=32,
                                               test_fraction=0.4, workers=1))
    assert is_dataset(both) and held_out(both, "default").split == "test"
    train_only = preprocess.main(preprocess.Settings(input=str(phantom_tree), output=str(tmp_path / "train"),
                                                     size=32, test_fraction=0.0, workers=1))
    split = held_out(train_only, "default")
    assert split.split == "train" and len(split) == len(CTSlices(train_only, "train"))
