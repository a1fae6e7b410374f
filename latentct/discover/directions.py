"""Latent directions: the shift sampler, the training step's losses, RCA, and the directions artifact.

Every discovery method (the learned deformator, SeFa, PCA, random, coordinate axes) writes the same
``directions.pt``, so the renderer and the metrics treat them alike:
    {"format", "method", "directions_count", "latent_dim", "matrix" (K, d) unit shifts,
     "deformator": {"kind", "args", "state_dict"} or None, "generator": {"path", "sha256"},
     "settings", "rca", "extra" (what a method reports beside its directions, e.g. the supervised fit)}
"""
from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentct.generators.interface import load_generator, sample_latents
from latentct.models.deformator import Deformator, FixedDirections
from latentct.train.checkpoint import load_file
from latentct.train.runtime import evaluating, unwrap
from latentct.util.io import atomic_torch_save
from latentct.util.settings import UserError


def make_shifts(batch: int, directions_count: int, shift_scale: float, min_shift: float, distribution: str,
                device, generator: torch.Generator | None = None):
    """Random direction indices, signed shift sizes with |eps| >= min_shift, and the (B, K) basis shifts."""
    idx = torch.randint(0, directions_count, (batch,), generator=generator).to(device)
    raw = torch.randn(batch, generator=generator) if distribution == "normal" else \
        2.0 * torch.rand(batch, generator=generator) - 1.0
    eps = shift_scale * raw
    eps = torch.where((eps >= 0) & (eps < min_shift), torch.full_like(eps, min_shift), eps)
    eps = torch.where((eps < 0) & (eps > -min_shift), torch.full_like(eps, -min_shift), eps).to(device)
    basis = torch.zeros(batch, directions_count, device=device)
    basis[torch.arange(batch, device=device), idx] = eps
    return idx, eps, basis


def step_losses(G: nn.Module, deformator: nn.Module, reconstructor: nn.Module, z, idx, eps, basis,
                label_weight: float, shift_weight: float, form: str = "split"):
    """Losses of one direction-training step.

    split: G(z) under no_grad, only the shifted branch carries a graph (G frozen): the fast form on CPU.
    concat: one G call on [z; z + shift] (the graph covers both halves).
    naive: the original code's form, two calls with graphs and G's weight gradients computed.
    All three give the same losses and deformator gradients (G in eval mode).
    """
    shift = deformator(basis)
    if form == "split":
        with torch.no_grad():
            base = G(z)
        shifted = G(z + shift)
    elif form == "concat":
        both = G(torch.cat([z, z + shift]))
        base, shifted = both[: z.shape[0]].detach(), both[z.shape[0]:]
    elif form == "naive":
        base, shifted = G(z), G(z + shift)
    else:
        raise ValueError(f"--step-form: {form!r} is not split, concat or naive")
    check_image_size(reconstructor, base)
    logits, eps_pred = reconstructor(base, shifted)
    label_loss = label_weight * F.cross_entropy(logits.float(), idx)
    shift_loss = shift_weight * (eps_pred.float() - eps).abs().mean()
    return label_loss + shift_loss, label_loss, shift_loss, logits


# The smallest image side each reconstructor accepts (models/reconstructor.py): the LeNet's three 5 x 5
# convolutions and two 2 x poolings take 32 -> 28 -> 14 -> 10 -> 5 -> 1; the ResNet's padded strides take any size.
SMALLEST_SIDE = {"LeNet": 32}


def check_image_size(reconstructor: nn.Module, images: torch.Tensor) -> None:
    """A one-line error for images smaller than the reconstructor's kernels (else: 'Kernel size can't be greater
    than actual input size' from deep inside it)."""
    name = type(unwrap(reconstructor)).__name__
    side = SMALLEST_SIDE.get(name, 1)
    if min(images.shape[-2:]) < side:
        raise UserError(f"--reconstructor: the {name} needs images of at least {side} x {side} px and the "
                        f"generator's are {images.shape[-2]} x {images.shape[-1]}: use --reconstructor resnet")


def _pair(G, deformator, batch: int, shift_args: dict, device, gen: torch.Generator):
    """One fresh batch (k, G(z), G(z + shift)), the deformator in eval mode, no gradients."""
    with evaluating(deformator):
        z = sample_latents(G, batch, gen, device)
        idx, _, basis = make_shifts(batch, deformator.directions_count, generator=gen, device=device, **shift_args)
        return idx, G(z), G(z + deformator(basis))


def _batch_norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibrated(reconstructor: nn.Module, pairs) -> nn.Module:
    """A copy of the reconstructor whose BatchNorm statistics are estimated afresh, its weights frozen, as the plain
    average over ``pairs`` (an iterable of (k, image, shifted image); precise BN: Wu & Johnson, "Rethinking 'Batch'
    in BatchNorm", 2021; the same pass torch.optim.swa_utils.update_bn makes for averaged weights). Only the
    BatchNorm layers run in training mode. The reconstructor given is left as it is."""
    copy = deepcopy(unwrap(reconstructor)).eval()
    for p in copy.parameters():
        p.grad = None
    norms = _batch_norms(copy)
    if norms:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over every batch
            m.train()
        with torch.no_grad():
            for _, x, shifted in pairs:
                copy(x, shifted)
    return copy.eval()


def reconstructor_accuracy(G, deformator, reconstructor, batches: int, batch: int, shift_args: dict,
                           device, seed: int = 12345) -> float:
    """RCA: share of fresh (z, k, eps) whose direction k the reconstructor names, over ``batches`` batches, in eval
    mode as the reference measures it (GANLatentDiscovery's trainer.log_accuracy), with the reconstructor's
    BatchNorm statistics estimated first on as many other fresh batches (``recalibrated``). The running averages
    training leaves (momentum 0.1) trail weights that move fast: at the demo's settings (learning rate 1e-3, 300
    steps) they took the learned VAE reconstructor's accuracy far below what it does with its weights (docs/pipeline.md
    gives the figures); the reference trains at 1e-4 for 10^5 steps, where they have caught up. A deformator with
    BatchNorm (``fc``) is used in eval mode as it is, as its saved directions are."""
    gen = torch.Generator().manual_seed(seed)
    calibrating = batches if _batch_norms(unwrap(reconstructor)) else 0  # none: the scored batches as before
    calibrated = recalibrated(reconstructor, (_pair(G, deformator, batch, shift_args, device, gen)
                                              for _ in range(calibrating)))
    correct = 0
    with evaluating(calibrated):
        for _ in range(batches):
            idx, x, shifted = _pair(G, deformator, batch, shift_args, device, gen)
            logits, _ = calibrated(x, shifted)
            correct += int((logits.argmax(1) == idx).sum())
    return correct / (batches * batch)


# ------------------------------------------------------------------------------------------ artifact

def unit_directions(deformator: nn.Module) -> torch.Tensor:
    """(K, d): the latent shift of a unit step along each direction (exact for the linear kinds)."""
    device = next(iter(deformator.state_dict().values())).device
    with evaluating(deformator):
        return deformator(torch.eye(deformator.directions_count, device=device))


def save_directions(path: str | Path, method: str, deformator: nn.Module, G: nn.Module,
                    settings: dict, rca: float | None, deformator_args: dict | None = None,
                    extra: dict | None = None) -> None:
    """The artifact: directions, the generator's reference (how to rebuild it, the sha256 of every file
    involved) and the latents' spread that the settings' shift scale is in units of."""
    from latentct.generators.interface import KINDS, latent_spread

    ref = G.reference
    native = ref["kind"] in KINDS
    first = next(iter(ref["files"].items()))
    generator = {"ref": ref["ref"], "kind": ref["kind"], "options": ref["options"], "files": ref["files"],
                 "note": ref["note"], "path": first[0] if native else ref["ref"], "sha256": first[1] if native else None}
    state = {
        "format": 1, "method": method, "directions_count": deformator.directions_count,
        "latent_dim": deformator.latent_dim, "matrix": unit_directions(deformator).cpu(),
        "deformator": None if isinstance(deformator, FixedDirections) else {
            "kind": deformator.kind, "args": dict(deformator_args or {}),
            "state_dict": {k: v.detach().cpu() for k, v in deformator.state_dict().items()}},
        "generator": generator, "latent_spread": latent_spread(G),
        "diffusion": (ref["options"] or {}).get("diffusion"),  # a diffusion generator's view, ddim_steps, t_edit
        "settings": settings, "rca": rca, "extra": dict(extra or {}),
    }
    atomic_torch_save(state, path)


# What a method used beyond the generator (ground_truth.json's "supervision", issue 17 section 3): only "none"
# methods are label-free and ranked as such. A method started from, or unmixed inside, another method's
# directions inherits that method's tag where it is the stronger (extra["supervision"]).
SUPERVISION = {"supervised": "labels", "metadata": "metadata", "measurements": "measurements"}
SUPERVISION_ORDER = ("none", "measurements", "metadata", "labels")


class Directions:
    """A loaded directions artifact: ``shift(k, eps)`` gives latent shifts, exact for every deformator kind."""

    def __init__(self, state: dict, path: Path):
        self.path, self.state = path, state
        self.method = state["method"]
        self.matrix: torch.Tensor = state["matrix"]
        self.count, self.latent_dim = self.matrix.shape
        self.rca = state.get("rca")
        self.extra = state.get("extra") or {}
        # The range the directions were trained (or scored) with, in latent units (the settings give it in units
        # of the latents' spread): evaluation sweeps the same range.
        self.latent_spread = float(state.get("latent_spread", 1.0))
        self.shift_scale = float((state.get("settings") or {}).get("shift_scale") or 6.0) * self.latent_spread
        if state["deformator"] is None:
            self.module = FixedDirections(self.matrix)
        else:
            d = state["deformator"]
            self.module = Deformator(d["kind"], **d["args"])
            self.module.load_state_dict(d["state_dict"])
        self.module.eval().requires_grad_(False)

    def shifts(self, k: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(N,) direction indices and (N,) sizes -> (N, d) latent shifts."""
        basis = torch.zeros(len(k), self.count)
        basis[torch.arange(len(k)), k] = eps.float()
        with torch.no_grad():
            return self.module(basis)

    @property
    def supervision(self) -> str:
        """"none", "measurements", "metadata" or "labels": the stronger of the method's own and what it inherits."""
        tags = (SUPERVISION.get(self.method, "none"), self.extra.get("supervision", "none"))
        return max(tags, key=SUPERVISION_ORDER.index)

    def unit_rows(self) -> torch.Tensor:
        """(K, d) float64: the latent shift of one unit along each direction, for every deformator kind."""
        return self.shifts(torch.arange(self.count), torch.ones(self.count)).double()

    def generator_ref(self) -> str:
        record = self.state["generator"]
        return record.get("ref", record["path"])


def load_directions(path: str | Path, generator: str | Path | None = None, weights: str | None = None,
                    args: str | None = None) -> tuple[Directions, nn.Module]:
    """The artifact and its generator, rebuilt from the recorded reference (or ``generator``, ``weights`` and
    ``args``, a JSON object of a factory's arguments, in place of the recorded ones); a missing generator, or
    one whose files differ from those the directions were found for, is a clear error."""
    from latentct.generators.interface import parse_generator_args
    from latentct.generators.plugins import is_factory

    path = Path(path)
    state = load_file(path, "directions file")
    if not isinstance(state, dict) or "matrix" not in state or "generator" not in state:
        raise UserError(f"{path}: not a LatentCT directions file")
    directions = Directions(state, path)
    record = state["generator"]
    ref = str(generator) if generator else directions.generator_ref()
    if not is_factory(ref) and not Path(ref).is_file():
        raise UserError(f"{path}: its generator {ref} is missing; pass the generator file explicitly")
    options = dict(record.get("options") or {})
    options["weights"] = weights or options.get("weights")
    if args is not None:
        options["args"] = parse_generator_args(args)
    if options["weights"] and not Path(options["weights"]).is_file():
        raise UserError(f"{path}: its generator's weights {options['weights']} are missing; pass --generator-weights")
    G = load_generator(ref, **options)
    expected = record.get("files") or {record["path"]: record["sha256"]}
    if sorted(G.reference["files"].values()) != sorted(expected.values()):
        shown = next(iter(expected.values()))[:12]
        raise UserError(f"{path}: directions were found for generator {directions.generator_ref()} "
                        f"(sha256 {shown}), not for {ref}")
    return directions, G


def rca_line(output) -> str:
    """A directions run's one line for the pipeline: its reconstructor classification accuracy."""
    rca = torch.load(Path(output) / "directions.pt", weights_only=True)["rca"]
    return "RCA not measured" if rca is None else f"RCA {rca:.3f}"
