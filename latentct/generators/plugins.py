"""Generators a researcher brings: a factory in a Python file or module, a TorchScript file, or a torch.export
program, wrapped so that every stage sees the one generator interface (latentct/generators/interface.py).

    --generator path/to/model.py:make_decoder --generator-args '{"channels": 64}' --generator-weights w.pt
    --generator package.module:factory
    --generator scripted.pt                 (torch.jit.save)      --generator program.pt2   (torch.export.save)

What the module declares (attributes; the flags of the same names override them):
    latent_shape   a tuple, e.g. (32,) or (4, 16, 16); directions live in the flattened space
    output_range   the values its output spans, default (-1, 1)
    output_window  the HU that the two ends of that range stand for, e.g. (-1000, 2000); without one the
                   anatomy measurements are off and the report says so
Output (B, C, H, W) with C of 1 or 3 (3 channels are averaged to one for every measurement and for the
reconstructor), or (B, 1, D, H, W) for a volume: then the axial, coronal and sagittal mid-planes (resized to
one size, max(D, H) x max(W, H), when the volume is not a cube) are the three channels every later stage sees.
On loading it is called on 4 latents from its prior: an output size that changes with the batch size, or NaN,
stops with one line; values well outside output_range get a printed note.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import re
import sys
import textwrap
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentct.generators.interface import file_hash
from latentct.util.settings import UserError

WEIGHTS_KEYS = ("state_dict", "model", "generator", "weights")  # where a checkpoint dict may hold the weights


def is_factory(ref: str) -> bool:
    """``file.py:name`` or ``package.module:name`` (and not a file that exists)."""
    return ":" in ref and not Path(ref).is_file() and ref.rsplit(":", 1)[1].isidentifier()


def absolute_ref(ref: str) -> str:
    """``ref`` with its file made absolute (``file.py:name`` too), so that a record of it works from any
    folder; ``package.module:name`` is left as it is."""
    if not is_factory(ref):
        return str(Path(ref).resolve())
    target, name = ref.rsplit(":", 1)
    return f"{Path(target).resolve()}:{name}" if target.endswith(".py") else ref


def one_line(text: str, width: int = 160) -> str:
    """The first line of an error's text for a one-line message: terminal escape codes (torch's bold) removed,
    cut at a word boundary."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(text)).strip().splitlines()
    return textwrap.shorten(lines[0] if lines else "", width, placeholder=" ...")


def pickled_class(err: Exception) -> str | None:
    """The class a ``weights_only`` load refused (a whole object saved with torch.save), else None."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else None


def load_factory(ref: str, args: dict) -> tuple[nn.Module, dict]:
    """Call the factory ``ref`` with ``args``; (module, {file: sha256} of the factory's source)."""
    target, name = ref.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserError(f"--generator: {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"latentct_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise UserError(f"--generator: importing {path} failed ({type(err).__name__}: {one_line(err)})") from None
        source = path
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise UserError(f"--generator: cannot import {target} ({err})") from None
        source = Path(inspect.getfile(module))
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserError(f"--generator: {target} has no callable {name!r}")
    try:
        inspect.signature(factory).bind(**args)
    except TypeError as err:  # a missing or unknown argument: the arguments come from --generator-args
        raise UserError(f"--generator-args: {ref} {err} (given {json.dumps(args)}); pass its arguments as "
                        "--generator-args '{\"name\": value}'") from None
    except ValueError:
        pass  # no signature to read (a builtin): the call says what is wrong
    try:
        made = factory(**args)
    except Exception as err:
        raise UserError(f"--generator: {ref}({json.dumps(args)}) raised {type(err).__name__}: "
                        f"{one_line(err)}") from None
    if isinstance(made, dict) and "unet" in made:  # a MONAI diffusion model (latentct/generators/diffusion.py)
        from latentct.generators.diffusion import diffusion_plugin

        made = diffusion_plugin(made, ref)
    if not isinstance(made, nn.Module):
        raise UserError(f"--generator: {ref} returned {type(made).__name__}, not a torch.nn.Module (nor a diffusion "
                        "model's dict with a 'unet')")
    return made, {str(source.resolve()): file_hash(source)}


def load_weights(module: nn.Module, path: str) -> dict:
    """Plain weights (``weights_only=True``): a state dict, or a dict holding one under a key of WEIGHTS_KEYS."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--generator-weights: {file} does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        pickled = pickled_class(err)
        what = f"a pickled {pickled}" if pickled else f"{type(err).__name__}: {one_line(err, 120)}"
        raise UserError(f"--generator-weights: {file} is not plain weights ({what}); save a state_dict with "
                        "torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict):
        for key in WEIGHTS_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--generator-weights: {file} holds no state dict (nor one under {', '.join(WEIGHTS_KEYS)})")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:  # its first two lines name the module and the first mismatching key
        first = " ".join(str(err).splitlines()[:2])
        raise UserError(f"--generator-weights: {file} does not fit the module: {one_line(first, 300)}") from None
    return {str(file.resolve()): file_hash(file)}


def load_compiled(path: Path) -> tuple[nn.Module, str]:
    """A TorchScript file or a torch.export program: (module, "torchscript" | "export")."""
    with quiet_export():
        try:
            return torch.jit.load(str(path), map_location="cpu"), "torchscript"
        except Exception:
            pass
        try:
            return torch.export.load(str(path)).module(), "export"
        except Exception as err:
            raise UserError(f"--generator: {path} is neither a LatentCT generator file, nor TorchScript, nor a "
                            f"torch.export program ({type(err).__name__})") from None


@contextlib.contextmanager
def quiet_export():
    """No warnings while probing a file's format: torch.export logs a whole traceback for every file that is not
    one of its programs."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class PluginGenerator(nn.Module):
    """A foreign generator behind the one interface: flat latents (B, d) in, (B, P, H, W) in [-1, 1] out
    (P = 1 for slices, 3 for a volume's mid-planes), with ``window`` the HU of -1 and +1 (None: unknown)."""

    def __init__(self, module: nn.Module, latent_shape, output_range=(-1.0, 1.0), output_window=None,
                 kind: str = "factory"):
        super().__init__()
        self.module = module
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.latent_dim = math.prod(self.latent_shape)
        self.output_range = tuple(float(v) for v in output_range)
        self.window = tuple(float(v) for v in output_window) if output_window is not None else None
        self.kind = kind
        self.hookable = kind == "factory"  # TorchScript and exported programs run without forward hooks
        if not self.output_range[1] > self.output_range[0]:
            raise UserError(f"--output-range: {self.output_range} is not (low, high) with high > low")
        self.volume, self.notes = False, []  # notes: what the report should say about how the output was read
        out = self._raw(torch.zeros(1, self.latent_dim))
        if out.ndim == 5 and out.shape[1] == 1:
            self.volume = True
            self.notes += plane_notes(out.shape[2:])
        elif out.ndim == 4 and out.shape[1] == 3:
            self.notes.append("its 3 output channels (RGB) are averaged to one grey channel for every picture "
                              "and measurement")
        elif not (out.ndim == 4 and out.shape[1] == 1):
            raise UserError(f"--generator: declared latent_shape {self.latent_shape} but its output has shape "
                            f"{tuple(out.shape)}; expected (B, 1 or 3, H, W) or (B, 1, D, H, W)")
        self.planes = 3 if self.volume else 1

    def _raw(self, z: torch.Tensor) -> torch.Tensor:
        """The module's own output for latents z, for checking what it declared."""
        try:
            with torch.no_grad():
                return self.module(z.reshape(z.shape[0], *self.latent_shape))
        except Exception as err:
            raise UserError(f"--generator: calling it on latents of shape {(z.shape[0], *self.latent_shape)}"
                            f" failed ({type(err).__name__}: {one_line(err)}); check "
                            "--latent-shape") from None

    def check_batch(self, count: int = 4) -> None:
        """What z = 0 at batch 1 cannot show, on ``count`` latents from the prior: an output size that does not
        change with the batch size (an error), finite values (an error), and values within the output range
        (a printed note where they lie well outside it: a raw model's -3.5..6.7, or HU)."""
        from latentct.generators.interface import sample_latents

        z = sample_latents(self, count, torch.Generator().manual_seed(0))
        with torch.random.fork_rng(devices=[]):  # a sampler's own noise draws nothing from the seeded stream
            one, out = self._raw(z[:1]), self._raw(z)
        if out.shape != (count, *one.shape[1:]):
            raise UserError(f"--generator: its output's shape depends on the batch size: {tuple(one.shape)} for 1 "
                            f"latent, {tuple(out.shape)} for {count}")
        require_finite(out)
        low, high = self.output_range
        seen = float(out.min()), float(out.max())
        if seen[0] < low - 0.1 * (high - low) or seen[1] > high + 0.1 * (high - low):
            print(f"note: --generator: its output spans {seen[0]:.3g}..{seen[1]:.3g} on {count} latents from its "
                  f"prior, well outside its output range {low:g}..{high:g}: declare output_range (or pass "
                  "--output-range) so that its images map to [-1, 1]")

    def train(self, mode: bool = True):
        """An exported program has no train/eval mode (it was exported in the one it runs in)."""
        self.training = mode
        if self.kind != "export":
            self.module.train(mode)
        return self

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.module(z.reshape(z.shape[0], *self.latent_shape)).float()
        require_finite(out)
        low, high = self.output_range
        out = 2 * (out - low) / (high - low) - 1
        if self.volume:
            return mid_planes(out)
        return out.mean(1, keepdim=True) if out.shape[1] == 3 else out


def require_finite(out: torch.Tensor) -> None:
    """Stop where a generator's output is first seen to be NaN or infinite: downstream it would show as black
    frames, as a 'diverged' training and as NaN in the report. One reduction per call (a host sync on a GPU)."""
    bad = ~torch.isfinite(out.detach().flatten(1)).all(1)
    if bad.any():
        raise UserError(f"--generator: its output is NaN or infinite for {int(bad.sum())} of {len(out)} latents; "
                        "the generator (or its weights) fails there, not the direction training")


def plane_size(D: int, H: int, W: int) -> tuple[int, int]:
    """The one size of the three mid-planes: the axial (H, W), coronal (D, W) and sagittal (D, H) planes are
    each brought to the larger extent along each side, so no plane loses resolution."""
    return max(H, D), max(W, H)


def mid_planes(volume: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) -> (B, 3, *plane_size): the axial, coronal and sagittal mid-planes, each resized
    (bilinear) to the one plane size when the volume is not a cube."""
    B, _, D, H, W = volume.shape
    size = plane_size(D, H, W)
    planes = [volume[:, :, D // 2], volume[:, :, :, H // 2], volume[:, :, :, :, W // 2]]
    return torch.cat([p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                      for p in planes], dim=1)


def plane_notes(shape) -> list[str]:
    """What the report says of a non-cubic volume's planes: which were resized, from what to what."""
    D, H, W = (int(s) for s in shape)
    size = plane_size(D, H, W)
    resized = [f"{name} {a}x{b}" for name, (a, b) in (("axial", (H, W)), ("coronal", (D, W)), ("sagittal", (D, H)))
               if (a, b) != size]
    if not resized:
        return []
    return [f"volume {D}x{H}x{W}: mid-planes resized to one size {size[0]}x{size[1]} ({', '.join(resized)})"]


def declared(module: nn.Module, name: str, override):
    """A flag's value, else the module's attribute (``latent_dim`` stands in for ``latent_shape``)."""
    if override is not None:
        return override
    value = getattr(module, name, None)
    if value is None and name == "latent_shape" and getattr(module, "latent_dim", None) is not None:
        value = (int(module.latent_dim),)
    return value
