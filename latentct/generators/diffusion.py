"""A diffusion model as a generator: MONAI's DiffusionModelUNet, pixel space or in an AutoencoderKL's latent
(latent diffusion, Rombach et al. 2022), sampled by our own deterministic DDIM loop (Song et al. 2021, eta 0)
so that methods can differentiate through it. MONAI's inferers sample under ``torch.no_grad`` and its DDIM
scheduler clips x_0 by default. Its timesteps (``DDIMScheduler.set_timesteps``: 999, 888, ..., 0 for 10 steps)
are used here, its noise schedule (``alphas_cumprod``) and prediction type too, but not its ``step``: in MONAI
1.6.1 that moves by T // steps (999 -> 899), not to the next listed timestep (888), so the next UNet call would
see a sample at another noise level than it is told (the bug class of diffusers #12633). Each step here goes
from one listed timestep to the next (the last to alpha 1), and DDIM inversion mirrors it.

Two views, both through the one generator interface (latentct/generators/interface.py):

- **noise**: the latent is x_T (in latent diffusion the UNet's starting noise), flattened. The same x_T always
  gives the same image, alone or in a batch.
- **h**: the latent is [x_T, dh]. dh is an offset added to the output of the UNet's middle block (MONAI's
  ``mid_block_additional_residual``, right after it) at every DDIM step with t >= t_edit: Asyrp's h-space and its
  editing interval [t_edit, T] (Kwon et al., ICLR 2023). The edit is symmetric: the edited noise prediction
  enters both DDIM terms, where Asyrp's asymmetric process edits only the predicted x_0. Draws from the prior give
  dh = 0; directions live in dh only (``direction_block``). dh is given in units of the RMS of h at the first step
  of the window, so a shift of 6 means six of h's typical magnitudes along a unit direction, as a shift of 6 in
  x_T means six of its standard deviations.

Defaults: ``ddim_steps`` 10 (a CPU-sized deterministic sampler; the view records it), ``t_edit`` 500 of 1,000
training steps. Asyrp picks t_edit per dataset where LPIPS(x, P_t_edit) = 0.33; LPIPS needs pretrained weights this
tool cannot download, so the default is the schedule's midpoint and ``--t-edit`` sets another.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from latentct.util.settings import UserError

VIEWS = ("noise", "h")
# The spread of dh along each axis of a span when fitting on its coordinates in the h view: half the scorer's
# default shift range (+-6), so the fit sees changes of the size the sweeps make.
SPAN_SPREAD = 3.0
DEFAULT_VIEW = dict(view="noise", ddim_steps=10, t_edit=500)
# The LDM tutorial's schedule in MONAI (tutorials generation/2d_ldm): 1,000 steps, scaled-linear betas 0.0015-0.0195.
LATENT_SCHEDULE = dict(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
# The DDPM tutorial's (generation/2d_ddpm): 1,000 steps, linear betas 1e-4-0.02 (MONAI's defaults).
PIXEL_SCHEDULE = dict(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)


def build_unet(args: dict) -> nn.Module:
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(spatial_dims=2, **args)


def build_autoencoder(args: dict) -> nn.Module:
    from monai.networks.nets import AutoencoderKL

    return AutoencoderKL(spatial_dims=2, **args)


def ddim_scheduler(schedule: dict, steps: int):
    """MONAI's DDIM scheduler on ``schedule``, unclipped, with ``steps`` inference steps."""
    from monai.networks.schedulers import DDIMScheduler

    scheduler = DDIMScheduler(**schedule, clip_sample=False)
    scheduler.set_timesteps(steps)
    return scheduler


class DiffusionGenerator(nn.Module):
    """A UNet (and an autoencoder for latent diffusion) sampled by deterministic DDIM; ``configure`` picks the view.

    ``args`` (what generator.pt stores): unet (DiffusionModelUNet's arguments), autoencoder (AutoencoderKL's, or
    None in pixel space), schedule (the scheduler's), scale_factor (LatentDiffusionInferer's: latents are
    multiplied by it before the UNet and divided before decoding), sample_shape (x_T's shape)."""

    def __init__(self, unet: dict | nn.Module, autoencoder: dict | nn.Module | None, schedule: dict,
                 scale_factor: float, sample_shape: list[int]):
        super().__init__()
        self.unet = unet if isinstance(unet, nn.Module) else build_unet(unet)
        self.autoencoder = autoencoder if isinstance(autoencoder, nn.Module) or not autoencoder else \
            build_autoencoder(autoencoder)
        self.schedule, self.scale_factor = dict(schedule), float(scale_factor)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.configure(**DEFAULT_VIEW)

    # ------------------------------------------------------------------ the view
    def configure(self, view: str = "noise", ddim_steps: int = 10, t_edit: int = 500) -> nn.Module:
        if view not in VIEWS:
            raise UserError(f"--diffusion-view: {view!r} is not one of {', '.join(VIEWS)}")
        if not 1 <= ddim_steps <= self.schedule["num_train_timesteps"]:
            raise UserError(f"--ddim-steps: {ddim_steps} is not between 1 and the "
                            f"{self.schedule['num_train_timesteps']} training timesteps")
        if not 0 <= t_edit <= self.schedule["num_train_timesteps"]:
            raise UserError(f"--t-edit: {t_edit} is not between 0 and T = {self.schedule['num_train_timesteps']} "
                            "(T: an empty edit window)")
        self.view, self.ddim_steps, self.t_edit = view, int(ddim_steps), int(t_edit)
        self.scheduler = ddim_scheduler(self.schedule, self.ddim_steps)
        self.x_dim = math.prod(self.sample_shape)
        self.h_shape = self._h_shape()
        self.h_dim = math.prod(self.h_shape)
        self.latent_dim = self.x_dim + (self.h_dim if view == "h" else 0)
        self.latent_shape = (self.latent_dim,)
        self.direction_block = (self.x_dim, self.latent_dim) if view == "h" else (0, self.x_dim)
        self.h_rms, self._fit_basis = 1.0, None
        if view == "h" and self.steps_in_window():  # an empty window edits nothing: the unit stays 1
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                x_T = torch.randn(16, self.x_dim, generator=torch.Generator().manual_seed(0))
                h = self.h_at(x_T.to(self._device()), first=True)
            self.h_rms = float(h.pow(2).mean().sqrt())
        return self

    def fit_basis(self, count: int = 128) -> torch.Tensor | None:
        """The supervised ceiling's coordinates in the h view: the top ``count`` principal components of h (as
        (latent_dim, count) latent directions, with their standard deviations), computed once; None in the noise
        view, where x_T is isotropic and its principal components mean nothing."""
        if self.view != "h":
            return None
        if self._fit_basis is None:
            components, spread = h_principal_components(self, count)
            basis = torch.zeros(self.latent_dim, len(components), dtype=torch.float64)
            basis[self.x_dim:] = components.t()
            self._fit_basis = (basis, spread)
        return self._fit_basis

    def fit_in_span(self, n: int, basis: torch.Tensor, generator: torch.Generator, spread: float = SPAN_SPREAD
                    ) -> torch.Tensor:
        """Latents for a fit on a span's coordinates in the h view: x_T from the prior, dh isotropic inside the span
        ((latent_dim, k) orthonormal ``basis`` in the dh block), ``spread`` units along each of its axes."""
        z = self.draw_latents(n, generator)
        coords = torch.randn(n, basis.shape[1], generator=generator, dtype=torch.float64) * spread
        return z + (coords @ basis.double().t()).float()

    def fit_latents(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Latents for fitting a linear model of what the images show: x_T from the prior and, in the h view, dh
        drawn inside the top principal components of h with their own spread (draws of the prior have dh = 0,
        which leaves nothing to fit)."""
        z = self.draw_latents(n, generator)
        if self.view == "h":
            basis, spread = self.fit_basis()
            coords = torch.randn(n, basis.shape[1], generator=generator, dtype=torch.float64) * spread
            z = z + (coords @ basis.t()).float()
        return z

    def view_record(self) -> dict:
        """What directions.pt records of the view: rebuilt from it, EvalDirections samples the same images."""
        return {"view": self.view, "ddim_steps": self.ddim_steps, "t_edit": self.t_edit}

    def edited(self, t: int) -> bool:
        return self.view == "h" and t >= self.t_edit

    def steps_in_window(self) -> int:
        return int(sum(int(t) >= self.t_edit for t in self.scheduler.timesteps))

    def _device(self):
        return next(self.parameters()).device

    def _h_shape(self) -> tuple[int, ...]:
        shapes = []
        handle = self.unet.middle_block.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
        try:
            with torch.no_grad():
                x = torch.zeros(1, *self.sample_shape, device=self._device())
                self.unet(x, torch.zeros(1, dtype=torch.long, device=x.device))
        finally:
            handle.remove()
        return shapes[0]

    # ------------------------------------------------------------------ sampling
    def unedited(self, x_T: torch.Tensor) -> torch.Tensor:
        """Latents of starting noises x_T (N, x_dim) with no edit: dh = 0 appended in the h view."""
        if self.view != "h":
            return x_T
        return torch.cat([x_T, x_T.new_zeros(len(x_T), self.h_dim)], 1)

    def draw_latents(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """The prior: x_T ~ N(0, I), and dh = 0 in the h view."""
        x = torch.randn(n, self.x_dim, generator=generator) if generator is not None else \
            torch.randn(n, self.x_dim, device=device)
        return self.unedited(x).to(device or x.device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.sample(z)[0]

    def sample(self, z: torch.Tensor, record_h: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images (B, C, H, W) in [-1, 1] of latents z (B, latent_dim); with ``record_h`` also the middle block's
        outputs (before the offset) at the steps inside the edit window."""
        b = z.shape[0]
        x = z[:, :self.x_dim].reshape(b, *self.sample_shape)
        dh = z[:, self.x_dim:].reshape(b, *self.h_shape) * self.h_rms if self.view == "h" else None
        recorded: list[torch.Tensor] = []
        handle = None
        if record_h:
            handle = self.unet.middle_block.register_forward_hook(lambda m, i, o: recorded.append(o.detach()))
        try:
            for t, t_next in self.step_pairs():
                steps = torch.full((b,), t, dtype=torch.long, device=z.device)
                extra = dh if self.edited(t) else None
                out = self.unet(x, steps, mid_block_additional_residual=extra)
                if record_h and not t >= self.t_edit:
                    recorded.pop()
                x0, eps = self.predictions(out, t, x)
                a_next = self.alpha(t_next)
                x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        finally:
            if handle is not None:
                handle.remove()
        return self.decode(x), recorded

    def step_pairs(self) -> list[tuple[int, int | None]]:
        """(t, the next listed timestep, None after the last: alpha 1) of the deterministic sampler."""
        ts = [int(t) for t in self.scheduler.timesteps]
        return list(zip(ts, ts[1:] + [None]))

    def alpha(self, t: int | None) -> torch.Tensor:
        """The cumulative alpha at timestep t (1 for None, the clean end)."""
        return torch.tensor(1.0) if t is None else self.scheduler.alphas_cumprod[t].float()

    def predictions(self, out: torch.Tensor, t: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted x_0, predicted noise) from the UNet's output at timestep t, by its prediction type."""
        a = self.alpha(t)
        kind = str(getattr(self.scheduler.prediction_type, "value", self.scheduler.prediction_type))
        if kind == "epsilon":
            return (x - (1 - a).sqrt() * out) / a.sqrt(), out
        if kind == "sample":
            return out, (x - a.sqrt() * out) / (1 - a).sqrt()
        return a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x  # v_prediction

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is not None:
            x = self.autoencoder.decode_stage_2_outputs(x / self.scale_factor)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def h_at(self, x_T: torch.Tensor, first: bool = False) -> torch.Tensor:
        """h (the middle block's output, unedited) of starting noises x_T (N, x_dim): at every step inside the edit
        window, (N * steps, h_dim), or at its first step only."""
        _, recorded = self.sample(self.unedited(x_T), record_h=True)
        if not recorded:
            raise UserError(f"--t-edit: {self.t_edit} leaves no DDIM step in the edit window (the first step is at "
                            f"t = {int(self.scheduler.timesteps[0])})")
        recorded = recorded[:1] if first else recorded
        return torch.cat([h.flatten(1) for h in recorded]).float()

    @torch.no_grad()
    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Latents whose samples approximate ``images`` (B, C, H, W) in [-1, 1]: the autoencoder's mean (scaled),
        then the sampler's DDIM steps run backwards to x_T; dh = 0 in the h view."""
        x = images
        if self.autoencoder is not None:
            x = self.autoencoder.encode(images)[0] * self.scale_factor
        for t, t_next in reversed(self.step_pairs()):  # the sampler's steps backwards: from t_next's level to t's
            out = self.unet(x, torch.full((len(x),), t, dtype=torch.long, device=x.device))
            a_from, a_to = self.alpha(t_next), self.alpha(t)
            _, eps = self.predictions(out, t, x)  # the noise predicted at the level x is about to reach
            x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
            x = a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps
        return self.unedited(x.flatten(1))


def h_principal_components(G: DiffusionGenerator, count: int, samples: int = 64, seed: int = 0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, h_dim) principal directions of h over ``samples`` starting noises and the DDIM steps of the edit
    window (Haas et al. 2023 take PCA of h over samples and timesteps), in float64 on one thread with fixed signs;
    and each component's standard deviation in the view's units (h / h_rms)."""
    from latentct.discover.baselines import fix_signs, single_threaded

    gen = torch.Generator().manual_seed(seed * 7919 + 41)
    x_T = torch.randn(samples, G.x_dim, generator=gen).to(G._device())
    h = torch.cat([G.h_at(part) for part in x_T.split(32)]).cpu().double() / G.h_rms
    with single_threaded():
        centred = h - h.mean(0)
        _, s, v = torch.linalg.svd(centred, full_matrices=False)
    kept = int((s > 1e-6 * s[0]).sum())  # no component the data does not span (rows - 1 at most)
    count = min(count, kept)
    return fix_signs(v[:count]), (s[:count] / math.sqrt(max(len(h) - 1, 1)))


# ------------------------------------------------------------------ a researcher's own MONAI diffusion model

PLUGIN_KEYS = ("unet", "schedule", "sample_shape", "autoencoder", "scale_factor", "output_window")


def diffusion_plugin(made: dict, ref: str) -> DiffusionGenerator:
    """A factory's MONAI diffusion model: a dict with ``unet`` (a DiffusionModelUNet), ``schedule`` (the
    scheduler's keyword arguments, e.g. {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", ...}),
    ``sample_shape`` (x_T's shape, e.g. [4, 16, 16]), and for latent
    diffusion ``autoencoder`` (an AutoencoderKL) and ``scale_factor``; ``output_window`` (the HU of -1 and +1) is
    optional. Anything else is an error in one line."""
    def fail(problem: str):
        raise UserError(f"--generator: {ref} returned a diffusion model dict that {problem}")

    unknown = sorted(set(made) - set(PLUGIN_KEYS))
    if unknown:
        fail(f"has unknown keys {unknown} (known: {', '.join(PLUGIN_KEYS)})")
    unet = made.get("unet")
    if not isinstance(unet, nn.Module) or not hasattr(unet, "middle_block"):
        fail("has no 'unet' with a middle_block (a monai.networks.nets.DiffusionModelUNet)")
    schedule = made.get("schedule")
    if not isinstance(schedule, dict) or "num_train_timesteps" not in schedule:
        fail("has no 'schedule': the keyword arguments the scheduler was built with, as a dict with "
             "num_train_timesteps (a scheduler object does not keep its schedule's name and betas)")
    shape = made.get("sample_shape")
    if not isinstance(shape, (list, tuple)) or not shape or not all(isinstance(v, int) and v > 0 for v in shape):
        fail("has no 'sample_shape' (x_T's shape as a list of positive integers, e.g. [4, 16, 16])")
    autoencoder = made.get("autoencoder")
    if autoencoder is not None and not hasattr(autoencoder, "decode_stage_2_outputs"):
        fail("has an 'autoencoder' without decode_stage_2_outputs (a monai.networks.nets.AutoencoderKL)")
    scale = made.get("scale_factor", 1.0)
    if not isinstance(scale, (int, float)) or not scale > 0:
        fail(f"has a 'scale_factor' of {scale!r}, not a positive number")
    try:
        from monai.networks.schedulers import DDIMScheduler

        DDIMScheduler(**schedule)
    except (TypeError, ValueError) as err:
        fail(f"has a 'schedule' DDIMScheduler refuses ({err})")
    try:
        model = DiffusionGenerator(unet, autoencoder, schedule, float(scale), list(shape))
        with torch.no_grad():
            model.decode(torch.zeros(1, *shape))
    except (RuntimeError, ValueError) as err:
        fail(f"does not run on x_T of sample_shape {list(shape)} ({type(err).__name__}: "
             f"{str(err).splitlines()[0][:160]})")
    model.declared_window = made.get("output_window")
    return model


def load_plugin_weights(model: DiffusionGenerator, path: str) -> dict:
    """--generator-weights for a diffusion plug-in, keyed by module: {"unet": state dict, "autoencoder": state
    dict} (weights_only)."""
    from latentct.train.checkpoint import load_file

    state = load_file(path, "--generator-weights")
    wanted = ["unet"] + (["autoencoder"] if model.autoencoder is not None else [])
    if not isinstance(state, dict) or not all(isinstance(state.get(k), dict) for k in wanted):
        raise UserError(f"--generator-weights: {path} must hold a state dict per module: {wanted}")
    for key in wanted:
        try:
            getattr(model, key).load_state_dict(state[key])
        except RuntimeError as err:
            raise UserError(f"--generator-weights: {path}'s {key!r} does not fit its module: "
                            f"{' '.join(str(err).splitlines()[:2])[:300]}") from None
    from latentct.generators.interface import file_hash

    return {str(Path(path).resolve()): file_hash(path)}
