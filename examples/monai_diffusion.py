"""Your own MONAI latent diffusion model as a LatentCT generator, in both views (x_T, or h-space from fixed noise).

    python examples/monai_diffusion.py --generator runs/demo/diffusion/generator.pt --output runs/mine/weights.pt
    python Training/TrainDirections.py --generator examples/monai_diffusion.py:make_diffusion \
        --generator-weights runs/mine/weights.pt --diffusion-view h --method hpca --directions-count 8 \
        --no-rca --output runs/mine/hpca
    python EvalDirections.py --directions runs/mine/hpca/directions.pt --output Animations/mine_hpca \
        --dataset data/demo/slices_64

The factory returns a dict instead of a module: the UNet (DiffusionModelUNet), the noise schedule it was trained
with (the scheduler's keyword arguments, as a dict: a scheduler object keeps neither its schedule's name nor its betas), x_T's shape, and for latent diffusion the
AutoencoderKL and LatentDiffusionInferer's scale factor; ``output_window`` (the HU of -1 and +1) turns on the
anatomy measurements. LatentCT samples it with its own deterministic DDIM loop (latentct/generators/diffusion.py).
``--generator-weights`` holds one state dict per module: {"unet": ..., "autoencoder": ...}, loaded with
weights_only=True. The first command writes such a file from a LatentCT diffusion run, to show the format.
"""
from __future__ import annotations

import argparse

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

WINDOW = (-1000.0, 2000.0)  # the HU window of LatentCT's default preprocessing


def make_diffusion(latent_channels: int = 4, side: int = 16, unet_channels=(32, 64, 64),
                   attention=(False, False, True), ae_channels=(16, 32, 32), scale_factor: float = 1.0) -> dict:
    """The shapes of Training/TrainDiffusion.py --preset latent (64 px slices, a 4 x 16 x 16 latent)."""
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=latent_channels, out_channels=latent_channels,
                              num_res_blocks=1, channels=tuple(unet_channels), attention_levels=tuple(attention),
                              norm_num_groups=16, num_head_channels=16)
    autoencoder = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, num_res_blocks=1,
                                channels=tuple(ae_channels), attention_levels=(False,) * len(ae_channels),
                                latent_channels=latent_channels, norm_num_groups=8, with_encoder_nonlocal_attn=False,
                                with_decoder_nonlocal_attn=False)
    schedule = dict(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
    return {"unet": unet, "autoencoder": autoencoder, "schedule": schedule, "scale_factor": scale_factor,
            "sample_shape": [latent_channels, side, side], "output_window": WINDOW}


def export_weights(generator: str, output: str) -> float:
    """A LatentCT diffusion generator.pt as this factory's weights file; returns its scale factor (pass it as
    --generator-args '{"scale_factor": ...}')."""
    state = torch.load(generator, map_location="cpu", weights_only=True)
    split = {key: {k[len(key) + 1:]: v for k, v in state["state_dict"].items() if k.startswith(key + ".")}
             for key in ("unet", "autoencoder")}
    torch.save(split, output)
    return float(state["args"]["scale_factor"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", required=True, help="a LatentCT latent-diffusion generator.pt")
    parser.add_argument("--output", required=True, help="the weights file to write")
    args = parser.parse_args()
    scale = export_weights(args.generator, args.output)
    print(f"wrote {args.output}; pass --generator-args '{{\"scale_factor\": {scale:.6g}}}'")
