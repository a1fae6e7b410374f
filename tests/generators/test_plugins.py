"""Generators a researcher brings (latentct/generators/plugins.py, latentct/generators/interface.py, latentct/generators/latents.py): a MONAI
autoencoder through a factory with a spatial latent and encoded latents, TorchScript and torch.export files,
a 3D generator, and one-line errors for bad plug-ins."""
import json
import textwrap
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

import EvalDirections
from latentct.discover.directions import load_directions
from latentct.generators import latents as latents_cli
from latentct.generators.interface import load_generator
from latentct.util.settings import UserError, parse_settings
from Training import TrainDirections

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "monai_autoencoder.py"
TINY = ["--directions-count", "6", "--batch-size", "8", "--log-every", "1", "--eval-every", "4", "--rca-batches", "2",
        "--sample-every", "1000", "--reconstructor-width", "1", "--device", "cpu"]
EVAL = ["--frames", "5", "--report-samples", "3", "--report-shifts", "3", "--real-slices", "1", "--embed-steps", "2",
        "--grid-samples", "2", "--ground-truth", "off"]


def directions(generator: str, out: Path, *extra) -> dict:
    cfg = parse_settings(TrainDirections.Settings, ["--generator", generator, "--output", str(out), "--steps", "4",
                                                    *TINY, *extra])
    return TrainDirections.main(cfg)


@pytest.fixture(scope="module")
def monai_ae(dataset, tmp_path_factory):
    """The README's example autoencoder, trained for a few dozen steps at 32 px, and its encoded latents."""
    pytest.importorskip("monai")
    import importlib.util

    spec = importlib.util.spec_from_file_location("monai_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    folder = tmp_path_factory.mktemp("ae")
    weights = example.train(str(dataset), str(folder / "ae.pt"), steps=30, image_size=32, batch=8)
    latents_cli.main(parse_settings(latents_cli.Settings, [
        "--encoder", f"{EXAMPLE}:make_encoder", "--encoder-args", '{"image_size": 32}', "--encoder-weights",
        str(weights), "--data", str(dataset), "--output", str(folder / "latents.pt")]))
    return weights, folder / "latents.pt"


def test_monai_autoencoder_through_a_factory_end_to_end(monai_ae, dataset, tmp_path):
    weights, latents = monai_ae
    ref = f"{EXAMPLE}:make_decoder"
    plug = ["--generator-args", '{"image_size": 32}', "--generator-weights", str(weights), "--latents", str(latents)]
    G = load_generator(ref, args={"image_size": 32}, weights=str(weights), latents=str(latents))
    assert G.latent_shape == (2, 8, 8) and G.latent_dim == 128 and G.window == (-1000.0, 2000.0)
    assert G(torch.zeros(3, 128)).shape == (3, 1, 32, 32) and G.prior.shape[1] == 128
    directions(ref, tmp_path / "learned", *plug)
    directions(ref, tmp_path / "sefa", "--method", "sefa", *plug)
    found, G2 = load_directions(tmp_path / "learned" / "directions.pt")  # rebuilt from the record alone
    record = found.state["generator"]
    assert record["ref"] == ref and len(record["files"]) == 3  # the factory's source, the weights, the latents
    assert found.latent_spread != 1.0 and found.shift_scale == pytest.approx(6.0 * found.latent_spread)
    report = EvalDirections.main(parse_settings(EvalDirections.Settings, [
        "--directions", str(tmp_path / "learned" / "directions.pt"), "--output", str(tmp_path / "gallery"),
        "--compare", str(tmp_path / "sefa" / "directions.pt"), "--dataset", str(dataset), *EVAL]))
    assert report["anatomy"] == "measured" and len(report["directions"]) == 6 and report["generator_kind"] == "factory"
    assert report["real"] and report["real"][0]["embedding"] == "optimised z"
    assert (tmp_path / "gallery" / "index.html").is_file()
    changed = tmp_path / "changed.pt"
    state = torch.load(weights, weights_only=True)
    state["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, changed)
    record["options"]["weights"] = str(changed)
    torch.save(found.state, tmp_path / "moved.pt")
    with pytest.raises(UserError, match="directions were found for generator"):
        load_directions(tmp_path / "moved.pt")


def test_torchscript_and_export_files_of_the_dcgan(gan_run, tmp_path):
    native = load_generator(gan_run / "generator.pt")
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(native), str(scripted))
    window = ["--output-window", "-1000", "2000", "--channels-last", "off"]  # the same convolution kernels
    directions(str(gan_run / "generator.pt"), tmp_path / "native", "--channels-last", "off")
    directions(str(scripted), tmp_path / "script", *window)
    a = load_directions(tmp_path / "native" / "directions.pt")[0].matrix
    b = load_directions(tmp_path / "script" / "directions.pt")[0].matrix
    assert torch.allclose(a, b, atol=1e-5)  # the same learned directions for the same seed
    with pytest.raises(UserError, match="forward hook"):
        directions(str(scripted), tmp_path / "sefa", "--method", "sefa", *window)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(native, (torch.zeros(2, native.latent_dim),), dynamic_shapes={"z": {0: batch}})
    exported = tmp_path / "program.pt2"
    torch.export.save(program, str(exported))
    G = load_generator(exported, latent_shape=(native.latent_dim,), output_window=(-1000, 2000))
    assert G.reference["kind"] == "export" and not G.hookable
    assert torch.allclose(G(torch.ones(3, native.latent_dim)), native(torch.ones(3, native.latent_dim)), atol=1e-5)
    directions(str(exported), tmp_path / "export", "--latent-shape", str(native.latent_dim), *window)


VOLUME = '''
import torch
import torch.nn as nn


class Volumes(nn.Module):
    """z (B, 8) -> (B, 1, 32, 32, 32) volumes: a ball whose position and size the latent sets."""

    latent_shape = (8,)
    output_window = (-1000.0, 2000.0)

    def __init__(self):
        super().__init__()
        self.map = nn.Linear(8, 4)

    def forward(self, z):
        p = torch.tanh(self.map(z))
        g = torch.linspace(-1, 1, 32)
        zz, yy, xx = torch.meshgrid(g, g, g, indexing="ij")
        d = ((xx - 0.4 * p[:, 0, None, None, None]) ** 2 + (yy - 0.4 * p[:, 1, None, None, None]) ** 2
             + (zz - 0.4 * p[:, 2, None, None, None]) ** 2).sqrt()
        return torch.tanh(8 * (0.5 + 0.2 * p[:, 3, None, None, None] - d))[:, None] * 0.7


def make():
    torch.manual_seed(0)
    return Volumes()
'''


def test_a_3d_generator_end_to_end_shows_three_planes(tmp_path):
    (tmp_path / "volumes.py").write_text(textwrap.dedent(VOLUME))
    ref = f"{tmp_path / 'volumes.py'}:make"
    G = load_generator(ref)
    assert G.volume and G.planes == 3 and G(torch.zeros(2, 8)).shape == (2, 3, 32, 32)
    directions(ref, tmp_path / "learned")
    report = EvalDirections.main(parse_settings(EvalDirections.Settings, [
        "--directions", str(tmp_path / "learned" / "directions.pt"), "--output", str(tmp_path / "gallery"), *EVAL]))
    assert report["volume"] and "axial" in report["anatomy"]
    frame = iio.imread(tmp_path / "gallery" / report["directions"][0]["gif"], index=0)
    assert frame.shape[1] == 3 * 32  # axial, coronal and sagittal side by side
    assert "mid-planes side by side" in (tmp_path / "gallery" / "index.html").read_text()
    # no dataset, so no pixel spacing: the labels speak in pixels, as the page says
    assert report["spacing_note"] and not any(" mm per" in r["label"] or "cm2" in r["label"]
                                              for r in report["directions"])


RGB = '''
import torch
import torch.nn as nn


class Colour(nn.Module):
    """z (B, 6) -> (B, 3, 32, 32) RGB blobs, with no output_window: the HU its output stands for is unknown."""

    latent_shape = (6,)

    def __init__(self):
        super().__init__()
        self.map = nn.Linear(6, 3)

    def forward(self, z):
        g = torch.linspace(-1, 1, 32)
        yy, xx = torch.meshgrid(g, g, indexing="ij")
        p = torch.tanh(self.map(z))
        blob = torch.tanh(6 * (0.5 - ((xx - 0.3 * p[:, 0, None, None]) ** 2 + yy ** 2).sqrt()))
        return torch.stack([blob, blob * p[:, 1, None, None], blob * p[:, 2, None, None]], 1) * 0.8


def make():
    torch.manual_seed(0)
    return Colour()
'''


def test_an_rgb_generator_without_a_window_is_described_as_it_is(tmp_path):
    (tmp_path / "rgb.py").write_text(textwrap.dedent(RGB))
    ref = f"{tmp_path / 'rgb.py'}:make"
    directions(ref, tmp_path / "learned", "--reconstructor", "resnet", "--reconstructor-width", "4")
    report = EvalDirections.main(parse_settings(EvalDirections.Settings, [
        "--directions", str(tmp_path / "learned" / "directions.pt"), "--output", str(tmp_path / "gallery"), *EVAL]))
    assert "averaged to one grey channel" in report["generator_note"]
    assert report["axes"] == [] and report["distinct_effects"] is None  # nothing measured, no effects counted
    page = (tmp_path / "gallery" / "index.html").read_text()
    assert "No HU window declared" in page and "Pictures in the HU window" not in page
    assert "distinct effects" not in page


BAD = '''
import torch
import torch.nn as nn


class Flat(nn.Module):
    latent_shape = (8,)

    def __init__(self):
        super().__init__()
        self.map = nn.Linear(8, 16)

    def forward(self, z):
        return self.map(z)  # (B, 16): no image


class Ok(nn.Module):
    latent_shape = (8,)

    def __init__(self):
        super().__init__()
        self.map = nn.Linear(8, 32 * 32)

    def forward(self, z):
        return torch.tanh(self.map(z)).reshape(-1, 1, 32, 32)


def flat():
    return Flat()


def ok():
    return Ok()


def broken():
    raise ValueError("no weights here")


def needs(channels):
    return Ok()
'''


@pytest.mark.parametrize("case, expected", [
    ("missing_file", "does not exist"),
    ("missing_factory", "has no callable"),
    ("raises", "raised ValueError: no weights here"),
    ("shape", "declared latent_shape (8,) but its output has shape (1, 16)"),
    ("wrong_latent", "check --latent-shape"),
    ("weights_misfit", "does not fit the module"),
    ("weights_pickle", "is not plain weights (a pickled torch.nn.modules.linear.Linear); save a state_dict"),
    ("missing_argument", "--generator-args: {plug}:needs missing a required argument: 'channels' (given {{}}); "
                         "pass its arguments as --generator-args"),
    ("pickled_module", "--generator: {tmp}/pickled.pt is a pickled torch.nn.modules.linear.Linear (torch.save of a "
                       "whole module), which LatentCT does not unpickle: save its state_dict and write a factory"),
])
def test_bad_plug_ins_get_one_line_each(tmp_path, case, expected):
    (tmp_path / "plug.py").write_text(textwrap.dedent(BAD))
    plug = str(tmp_path / "plug.py")
    torch.save({"map.weight": torch.zeros(3, 3)}, tmp_path / "misfit.pt")
    torch.save(torch.nn.Linear(8, 8), tmp_path / "pickled.pt")  # a whole module: code, not plain weights
    calls = {
        "missing_file": lambda: load_generator(str(tmp_path / "nope.py") + ":ok"),
        "missing_factory": lambda: load_generator(plug + ":absent"),
        "raises": lambda: load_generator(plug + ":broken"),
        "shape": lambda: load_generator(plug + ":flat"),
        "wrong_latent": lambda: load_generator(plug + ":ok", latent_shape=(5,)),
        "weights_misfit": lambda: load_generator(plug + ":ok", weights=str(tmp_path / "misfit.pt")),
        "weights_pickle": lambda: load_generator(plug + ":ok", weights=str(tmp_path / "pickled.pt")),
        "missing_argument": lambda: load_generator(plug + ":needs"),
        "pickled_module": lambda: load_generator(tmp_path / "pickled.pt"),
    }
    with pytest.raises(UserError) as err:
        calls[case]()
    assert expected.format(plug=plug, tmp=tmp_path) in str(err.value) and "\n" not in str(err.value)
    assert "\x1b" not in str(err.value)  # torch's message carries terminal escape codes


def test_probing_a_file_format_is_quiet_and_messages_end_at_a_word(tmp_path, capfd):
    from latentct.generators.plugins import one_line

    torch.save({"map.weight": torch.zeros(2, 2)}, tmp_path / "plain.pt")  # weights, not a generator
    with pytest.raises(UserError, match="is neither a LatentCT generator file, nor TorchScript"):
        load_generator(tmp_path / "plain.pt")
    assert capfd.readouterr().err == ""  # was: ~19 lines of torch.export's traceback
    message = one_line("\x1b[1mWeights only load failed\x1b[0m. This file can still be loaded\nsecond line", 40)
    assert message == "Weights only load failed. This file ..."


def plug_in(tmp_path, source: str, factory: str) -> str:
    """``file.py:factory`` for a user's generator written to a temporary file."""
    path = tmp_path / "user_generator.py"
    path.write_text(textwrap.dedent(source))
    return f"{path}:{factory}"


CONV3D = '''
import torch
import torch.nn as nn


class Conv3d(nn.Module):
    """z (B, 8) -> (B, 1, 32, 32, 32) volumes through ConvTranspose3d layers (5-D weights)."""

    latent_shape = (8,)
    output_window = (-1000.0, 2000.0)

    def __init__(self):
        super().__init__()
        self.map = nn.Linear(8, 2 * 8 * 8 * 8)
        self.up = nn.Sequential(nn.ConvTranspose3d(2, 2, 4, 2, 1), nn.ReLU(), nn.ConvTranspose3d(2, 1, 4, 2, 1),
                                nn.Tanh())

    def forward(self, z):
        return self.up(self.map(z).reshape(-1, 2, 8, 8, 8))


def make():
    torch.manual_seed(0)
    return Conv3d()
'''


def test_channels_last_leaves_a_conv3d_volume_generator_alone(tmp_path):
    from latentct.generators.interface import place_generator
    from latentct.models.dcgan import Generator

    ref = plug_in(tmp_path, CONV3D, "make")
    result = directions(ref, tmp_path / "learned", "--channels-last", "on")  # was: required rank 4 tensor
    assert 0.0 <= result["rca"] <= 1.0
    G = place_generator(load_generator(ref), "cpu", torch.channels_last)
    assert G(torch.zeros(2, 8)).shape == (2, 3, 32, 32)
    native = Generator(8, 32, 4)
    native.kind = "dcgan"
    weight = place_generator(native, "cpu", torch.channels_last).main[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


SLAB = '''
import torch
import torch.nn as nn


class Slab(nn.Module):
    """z (B, 4) -> (B, 1, depth, side, side): a thin, non-cubic volume."""

    latent_shape = (4,)

    def __init__(self, depth, side):
        super().__init__()
        self.shape = (depth, side, side)
        self.map = nn.Linear(4, depth * side * side)

    def forward(self, z):
        return torch.tanh(self.map(z)).reshape(-1, 1, *self.shape)


def make(depth=8, side=32):
    torch.manual_seed(0)
    return Slab(depth, side)
'''


def test_a_non_cubic_volume_gives_planes_of_one_size_and_a_note(tmp_path):
    ref = plug_in(tmp_path, SLAB, "make")
    G = load_generator(ref)
    assert G(torch.zeros(2, 4)).shape == (2, 3, 32, 32)  # coronal and sagittal 8 x 32 brought to 32 x 32
    assert "coronal 8x32, sagittal 8x32" in G.reference["note"] and "axial" not in G.reference["note"]
    directions(ref, tmp_path / "slab", "--channels-last", "off")
    with pytest.raises(UserError, match=r"^--reconstructor: the LeNet needs images of at least 32 x 32 px and the "
                                        r"generator's are 16 x 16: use --reconstructor resnet$"):
        directions(ref, tmp_path / "thin", "--generator-args", '{"side": 16}')
    directions(ref, tmp_path / "resnet", "--generator-args", '{"side": 16}', "--reconstructor", "resnet")


NAN = '''
import torch
import torch.nn as nn


class FarNaN(nn.Module):
    """32 x 32 images, NaN for latents far from the origin (|z| > 5: rare under the prior, common once shifted)."""

    latent_shape = (8,)
    output_window = (-1000.0, 2000.0)

    def __init__(self):
        super().__init__()
        self.map = nn.Linear(8, 32 * 32)

    def forward(self, z):
        out = torch.tanh(self.map(z)).reshape(-1, 1, 32, 32)
        return torch.where(z.norm(dim=1)[:, None, None, None] > 5, torch.nan, out)


def make():
    torch.manual_seed(0)
    return FarNaN()
'''


def test_nan_output_is_named_where_it_is_first_seen(tmp_path):
    ref = plug_in(tmp_path, NAN, "make")
    expected = r"^--generator: its output is NaN or infinite for \d+ of \d+ latents; the generator"
    with pytest.raises(UserError, match=expected):  # was: "training diverged. Lower the learning rate"
        directions(ref, tmp_path / "learned")
    directions(ref, tmp_path / "random", "--method", "random", "--no-rca")
    with pytest.raises(UserError, match=expected):  # was: black frames and bare NaN in report.json
        EvalDirections.main(parse_settings(EvalDirections.Settings, [
            "--directions", str(tmp_path / "random" / "directions.pt"), "--output", str(tmp_path / "gallery"), *EVAL]))
    assert not (tmp_path / "gallery" / "report.json").exists()


def test_json_files_hold_null_for_nan(tmp_path):
    import numpy as np

    from latentct.util.io import atomic_write_json

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    atomic_write_json(tmp_path / "r.json", {"slope": float("nan"), "swd": [1.5, np.float32("inf")], "n": (2, 3)})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=strict) == {"slope": None,
                                                                                  "swd": [1.5, None], "n": [2, 3]}


BATCH = '''
import torch
import torch.nn as nn


class Raw(nn.Module):
    """32 x 32 images in the raw units of a model without a final tanh (about -3.5 to 6.5)."""

    latent_shape = (8,)

    def __init__(self, merge_batch):
        super().__init__()
        self.merge_batch = merge_batch
        self.map = nn.Linear(8, 32 * 32)

    def forward(self, z):
        out = 5 * torch.tanh(self.map(z)) + 1.5
        return out.reshape(1, -1, 32, 32) if self.merge_batch else out.reshape(-1, 1, 32, 32)


def make(merge_batch=False):
    torch.manual_seed(0)
    return Raw(merge_batch)
'''


def test_a_real_batch_is_checked_for_shape_and_range(tmp_path, capsys):
    ref = plug_in(tmp_path, BATCH, "make")
    load_generator(ref)
    note = capsys.readouterr().out.strip()
    assert note.startswith("note: --generator: its output spans -") and "\n" not in note
    assert "well outside its output range -1..1" in note
    load_generator(ref, output_range=(-3.5, 6.5))
    assert capsys.readouterr().out == ""  # within what it declares: no note
    with pytest.raises(UserError, match=r"^--generator: its output's shape depends on the batch size: "
                                        r"\(1, 1, 32, 32\) for 1 latent, \(1, 4, 32, 32\) for 4$"):
        load_generator(ref, args={"merge_batch": True})


SCALED = '''
import torch
import torch.nn as nn


class Scaled(nn.Module):
    latent_shape = (8,)
    output_window = (-1000.0, 2000.0)

    def __init__(self, gain):
        super().__init__()
        self.gain = gain
        self.map = nn.Linear(8, 32 * 32)

    def forward(self, z):
        return torch.tanh(self.gain * self.map(z)).reshape(-1, 1, 32, 32)


def make(gain=1.0):
    return Scaled(gain)
'''


def test_relative_paths_are_recorded_absolute_and_weights_can_be_overridden(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    Path("gen.py").write_text(textwrap.dedent(SCALED))
    torch.save({"map.weight": 0.3 * torch.randn(32 * 32, 8), "map.bias": torch.zeros(32 * 32)}, "w.pt")
    directions("gen.py:make", Path("run"), "--method", "random", "--no-rca", "--generator-weights", "w.pt")
    monkeypatch.chdir(tmp_path)  # evaluated from another folder
    found, G = load_directions("work/run/directions.pt")
    record = found.state["generator"]
    assert record["ref"] == f"{tmp_path / 'work' / 'gen.py'}:make"
    assert record["options"]["weights"] == str(tmp_path / "work" / "w.pt")
    Path("work/w.pt").rename("moved.pt")
    with pytest.raises(UserError, match=r"its generator's weights .*w\.pt are missing; pass --generator-weights$"):
        load_directions("work/run/directions.pt")
    _, G = load_directions("work/run/directions.pt", weights="moved.pt", args='{"gain": 2.0}')
    assert G.reference["options"]["args"] == {"gain": 2.0} and G.module.gain == 2.0
    report = EvalDirections.main(parse_settings(EvalDirections.Settings, [
        "--directions", "work/run/directions.pt", "--output", "gallery", "--generator-weights", "moved.pt",
        "--which", "0", *EVAL]))
    assert len(report["directions"]) == 1
