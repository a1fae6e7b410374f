"""The one generator interface: ``latent_dim`` (and ``latent_shape``), ``forward(z (B, d)) -> (B, P, H, W)`` in
[-1, 1] (P = 1, or 3 mid-planes of a volume), ``window`` (the HU of -1 and +1, or None when unknown),
``planes``, ``volume``, ``hookable`` (whether forward hooks reach its layers), ``prior`` (encoded latents to
sample z from, or None for N(0, I)) and ``reference`` (how to rebuild it and the sha256 of every file involved).

``generator.pt`` holds the weights plus the architecture arguments, so ``load_generator(path)`` rebuilds the
DCGAN generator or the VAE decoder with no script; the VAE's file also carries its encoder. Any other
generator comes in through latentct/generators/plugins.py: a factory, a TorchScript file or a torch.export program.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from latentct.generators.diffusion import DEFAULT_VIEW, VIEWS, DiffusionGenerator, load_plugin_weights
from latentct.models import dcgan, vae
from latentct.util.io import atomic_torch_save
from latentct.util.settings import UserError, check, setting

KINDS = {"dcgan": dcgan.Generator, "vae": vae.Decoder, "diffusion": DiffusionGenerator}


def save_generator(path: str | Path, kind: str, model: nn.Module, args: dict, window, dataset: str,
                   encoder: nn.Module | None = None, encoder_args: dict | None = None) -> None:
    from latentct.data.slices import parse_window

    state = {"kind": kind, "args": dict(args), "state_dict": _plain_state(model), "window": list(parse_window(window)),
             "dataset": str(dataset), "format": 1}
    if encoder is not None:
        state["encoder_state_dict"] = _plain_state(encoder)
        state["encoder_args"] = dict(encoder_args or args)
    atomic_torch_save(state, path)


def _plain_state(model: nn.Module) -> dict:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)     # DistributedDataParallel wrapper
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _read(path: str | Path) -> dict:
    from latentct.train.checkpoint import load_file

    state = load_file(path, "generator file")
    if not isinstance(state, dict) or state.get("kind") not in KINDS:
        raise UserError(f"{path}: not a LatentCT generator file (kind {state.get('kind') if isinstance(state, dict) else '?'})")
    return state


@dataclass
class GeneratorOptions:
    """How to build a generator that is not a LatentCT generator.pt (latentct/generators/plugins.py)."""

    generator_args: str = setting("{}", "keyword arguments of a --generator factory, as JSON")
    generator_weights: str | None = setting(None, "weights for a factory's module: a state dict (or a dict holding "
                                            "one under state_dict, model, generator or weights), loaded with "
                                            "weights_only=True")
    latent_shape: tuple[int, ...] | None = setting(None, "the generator's latent shape, e.g. 4 16 16 (default: "
                                                   "what it declares)")
    output_range: tuple[float, float] | None = setting(None, "the values its output spans (default: what it "
                                                       "declares, else -1 1)")
    output_window: tuple[float, float] | None = setting(None, "the HU the two ends of the output range stand "
                                                        "for (default: what it declares; none: no anatomy)")
    latents: str | None = setting(None, "encoded latents (.pt, N x latent_shape) to draw z from instead of N(0, I): "
                                  "for autoencoders (python -m latentct.generators.latents writes one)")
    diffusion_view: str | None = setting(None, "a diffusion generator's latent: noise (x_T) or h (an offset after "
                                         "the UNet's middle block from fixed noise) (default: noise)",
                                         choices=(None, *VIEWS))
    ddim_steps: int | None = setting(None, "a diffusion generator's deterministic DDIM steps per sample (default: "
                                     f"{DEFAULT_VIEW['ddim_steps']})")
    t_edit: int | None = setting(None, "the h view's edit window: the offset is added at every step with t >= "
                                 f"t_edit (Asyrp's interval; default {DEFAULT_VIEW['t_edit']} of 1,000)")

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent:
            parent()
        parse_generator_args(self.generator_args)

    def generator_options(self) -> dict:
        return {"args": parse_generator_args(self.generator_args), "weights": self.generator_weights,
                "latent_shape": self.latent_shape, "output_range": self.output_range,
                "output_window": self.output_window, "latents": self.latents, "diffusion": self.diffusion_options()}

    def diffusion_options(self) -> dict | None:
        given = {"view": self.diffusion_view, "ddim_steps": self.ddim_steps, "t_edit": self.t_edit}
        return {k: v for k, v in given.items() if v is not None} or None


def parse_generator_args(text: str) -> dict:
    """--generator-args: a JSON object of the factory's keyword arguments."""
    try:
        args = json.loads(text)
    except json.JSONDecodeError as err:
        check(False, "generator_args", f"is not JSON ({err.msg})")
    check(isinstance(args, dict), "generator_args", "must be a JSON object")
    return args


def load_generator(ref: str | Path, device="cpu", args: dict | None = None, weights: str | None = None,
                   latent_shape=None, output_range=None, output_window=None, latents: str | None = None,
                   diffusion: dict | None = None, memory_format=torch.contiguous_format) -> nn.Module:
    """Rebuild a generator, frozen and in eval mode, from a LatentCT generator.pt, a factory (``file.py:name``,
    ``package.module:name``), a TorchScript file or a torch.export program; placed with ``place_generator``.
    ``diffusion`` ({view, ddim_steps, t_edit}) sets a diffusion generator's view (latentct/generators/diffusion.py);
    the view it resolves to is recorded in its reference, so directions rebuild the same one."""
    from latentct.generators import plugins

    ref = str(ref)
    absolute = lambda path: str(Path(path).resolve()) if path else None  # noqa: E731
    # The options are recorded with the directions: absolute paths load from any folder.
    options = {"args": dict(args or {}), "weights": absolute(weights), "latent_shape": latent_shape,
               "output_range": output_range, "output_window": output_window, "latents": absolute(latents),
               "diffusion": diffusion}
    note = None
    if plugins.is_factory(ref):
        with torch.random.fork_rng(devices=[]):
            module, files = plugins.load_factory(ref, options["args"])
        diffusion_plugin = isinstance(module, DiffusionGenerator)
        if weights:
            files.update(load_plugin_weights(module, weights) if diffusion_plugin else plugins.load_weights(module,
                                                                                                             weights))
        else:
            note = "weights the factory loads by itself are not covered by the recorded hashes"
        if diffusion_plugin:  # our sampler around the user's MONAI networks: the native interface, not a wrapper
            model = module.eval()
            window = output_window or module.declared_window
            model.window, model.dataset = (tuple(float(v) for v in window) if window else None), None
            model.planes, model.volume, model.hookable, model.kind = 1, False, True, "factory"
        else:
            model = _plugin(module.eval(), options, "factory")
    elif Path(ref).is_file():
        files = {str(Path(ref).resolve()): file_hash(ref)}
        state = _native_state(ref)
        if state is not None:
            with torch.random.fork_rng(devices=[]):  # loading draws nothing from the seeded stream, whatever the format
                model = KINDS[state["kind"]](**state["args"])
            model.load_state_dict(state["state_dict"])
            model.window, model.dataset = tuple(state["window"]), state.get("dataset")
            model.latent_shape, model.planes, model.volume, model.hookable = (model.latent_dim,), 1, False, True
            model.kind = state["kind"]
        else:
            module, kind = plugins.load_compiled(Path(ref))
            model = _plugin(module, options, kind)
    else:
        raise UserError(f"--generator: {ref} does not exist (a generator.pt, TorchScript or export file, or "
                        "file.py:factory)")
    if isinstance(model, DiffusionGenerator):  # ours, or a plug-in's MONAI networks in our sampler
        with torch.random.fork_rng(devices=[]):
            model.eval().configure(**{**DEFAULT_VIEW, **(diffusion or {})})  # sets latent_dim and latent_shape
        options["diffusion"] = model.view_record()
    elif diffusion:
        raise UserError(f"--diffusion-view/--ddim-steps/--t-edit: {ref} is not a diffusion generator")
    model.prior = load_latents(latents, model.latent_shape) if latents else None
    if hasattr(model, "check_batch"):  # a plug-in: its output on real latents, now that its prior is known
        model.check_batch()
    if latents:
        files[str(Path(latents).resolve())] = file_hash(latents)
    note = "; ".join(n for n in [note, *getattr(model, "notes", [])] if n) or None
    model.reference = {"ref": plugins.absolute_ref(ref), "kind": getattr(model, "kind", "native"), "options": options,
                       "files": files, "note": note}
    return place_generator(model, device, memory_format).eval().requires_grad_(False)


def place_generator(G: nn.Module, device, memory_format=torch.contiguous_format) -> nn.Module:
    """G on ``device``, in ``memory_format`` only if it is one of our generators: channels_last was measured
    faster for them (bench/eval.py, bench/directions.py), never for a user's plug-in, and it fails outright on
    a volume generator's 5-D weights (ConvTranspose3d). A plug-in keeps its own layout, and so does a diffusion
    generator: forward-mode autodiff through MONAI's GroupNorm fails on channels_last tensors (the spectral
    method's Jacobian-vector products)."""
    if getattr(G, "kind", None) in ("dcgan", "vae"):
        return G.to(device, memory_format=memory_format)
    return G.to(device)


def _native_state(path) -> dict | None:
    """A LatentCT generator file's contents, or None for any other file (TorchScript, export, ...); a pickled
    object (a whole module saved with torch.save) is an error that says what to save instead."""
    import zipfile

    from latentct.generators.plugins import pickled_class

    try:
        with zipfile.ZipFile(path) as archive:  # TorchScript: torch.load would warn and dispatch to torch.jit.load
            if any(name.endswith("constants.pkl") for name in archive.namelist()):
                return None
    except (zipfile.BadZipFile, OSError):
        pass
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if pickled_class(err):
            raise UserError(f"--generator: {path} is a pickled {pickled_class(err)} (torch.save of a whole module), "
                            "which LatentCT does not unpickle: save its state_dict and write a factory that builds "
                            "it, then pass --generator file.py:name --generator-weights state.pt") from None
        return None
    return state if isinstance(state, dict) and state.get("kind") in KINDS else None


def _plugin(module: nn.Module, options: dict, kind: str) -> nn.Module:
    from latentct.generators.plugins import PluginGenerator, declared

    shape = declared(module, "latent_shape", options["latent_shape"])
    if shape is None:
        raise UserError("--latent-shape: the generator declares no latent_shape (nor latent_dim); pass --latent-shape")
    model = PluginGenerator(module, shape, declared(module, "output_range", options["output_range"]) or (-1.0, 1.0),
                            declared(module, "output_window", options["output_window"]), kind)
    model.dataset = None
    return model


def load_latents(path: str, latent_shape) -> torch.Tensor:
    """Encoded latents (N, *latent_shape) as (N, d) float: the prior z is drawn from."""
    from latentct.train.checkpoint import load_file

    latents = load_file(path, "latents file")
    if isinstance(latents, dict):
        latents = latents.get("latents")
    if not isinstance(latents, torch.Tensor) or latents.ndim < 2:
        raise UserError(f"--latents: {path} holds no (N, ...) tensor of latents")
    flat = latents.reshape(len(latents), -1).float()
    d = 1
    for s in latent_shape:
        d *= int(s)
    if flat.shape[1] != d:
        raise UserError(f"--latents: {path} has latents of size {flat.shape[1]}, the generator's latent size is {d}")
    return flat


def sample_latents(G: nn.Module, n: int, generator: torch.Generator | None = None, device=None,
                   part: str | None = None) -> torch.Tensor:
    """n latents from G's prior: N(0, I), or rows of its encoded latents. Drawn on the CPU when a generator is
    given (seeded draws), then moved to ``device``. ``part`` keeps fitting and scoring apart under encoded
    latents (drawn with replacement): "fit" draws from the even rows, "score" from the odd ones."""
    prior = getattr(G, "prior", None)
    if prior is None and hasattr(G, "draw_latents"):  # a diffusion generator's h view: dh = 0 in every draw
        return G.draw_latents(n, generator, device).to(device or "cpu")
    if prior is None:
        if generator is not None:
            return torch.randn(n, G.latent_dim, generator=generator).to(device or "cpu")
        return torch.randn(n, G.latent_dim, device=device)
    if part is not None:
        prior = prior[{"fit": 0, "score": 1}[part]::2]
    idx = torch.randint(0, len(prior), (n,), generator=generator)
    return prior[idx].to(device or "cpu")


def report_latents(G: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
    """The n latents every direction (and the pooled null) is scored on. Where the prior is symmetric about 0
    (N(0, I); a diffusion model's x_T with dh = 0) they come in antithetic pairs z, -z: the part of a direction's
    effect that varies linearly over the latent cancels within each pair, so the counts move less from one draw
    of latents to the next (docs/ground-truth.md, "How steady the counts are"). Encoded latents are not symmetric:
    they are drawn as ``sample_latents(part="score")``."""
    if pairing(G) == "independent":
        return sample_latents(G, n, generator, part="score")
    half = sample_latents(G, (n + 1) // 2, generator)
    return torch.cat([half, -half])[:n]


def pairing(G: nn.Module) -> str:
    """How ``report_latents`` draws for G: "antithetic" under N(0, I) (every generator without encoded latents;
    a diffusion model's x_T, with dh = 0 in the h view), "independent" under encoded latents."""
    return "independent" if getattr(G, "prior", None) is not None else "antithetic"


def direction_block(G: nn.Module) -> tuple[int, int]:
    """The latent coordinates directions live in, (start, stop): all of them, except in a diffusion generator's h
    view, where directions move dh only."""
    return tuple(getattr(G, "direction_block", (0, G.latent_dim)))


def in_block(G: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """(K, stop - start) rows in the direction block -> (K, latent_dim) latent directions (zero elsewhere), on the
    rows' device."""
    start, stop = direction_block(G)
    out = rows.new_zeros(len(rows), G.latent_dim)
    out[:, start:stop] = rows
    return out


def latent_spread(G: nn.Module) -> float:
    """The scale shifts are given in: 1 for N(0, I), else the mean per-dimension standard deviation of the
    encoded latents, so a shift of 6 means the same on every model."""
    prior = getattr(G, "prior", None)
    return 1.0 if prior is None else float(prior.std(0).mean())


def load_encoder(path: str | Path, device="cpu") -> nn.Module | None:
    """The VAE's encoder stored beside its decoder, or None for generators without one."""
    state = _read(path)
    if "encoder_state_dict" not in state:
        return None
    model = vae.Encoder(**state["encoder_args"])
    model.load_state_dict(state["encoder_state_dict"])
    return model.to(device).eval().requires_grad_(False)


def own_encoder(G: nn.Module, path: str | Path, device="cpu") -> nn.Module | None:
    """The encoder stored beside a LatentCT generator.pt (a VAE's); None for other kinds and plug-ins."""
    return load_encoder(path, device) if G.reference["kind"] in KINDS else None


def generator_info(path: str | Path) -> dict:
    """What a LatentCT generator file says of itself (kind, args, window, dataset)."""
    state = _read(path)
    return {k: state[k] for k in ("kind", "args", "window", "dataset")}


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_size(G: nn.Module) -> int:
    """The side in pixels of the images a generator makes: one forward pass at z = 0."""
    device = next((p.device for p in G.parameters()), torch.device("cpu"))
    with torch.no_grad():
        return int(G(torch.zeros(1, G.latent_dim, device=device)).shape[-1])
