"""Deformators: map a shift e_k * eps in direction space (K) to a latent shift (d), as Voynov & Babenko 2020.

linear: a learned matrix; proj: a learned matrix whose output is rescaled to norm |eps|; ortho: an orthonormal
matrix exp(S - S^T) (torch.linalg.matrix_exp, any device; K = d); fc: a residual MLP. A bias is off by default:
with one, +eps and -eps are not opposite shifts. Frozen directions (the original's "id" and "random" kinds, and
every closed-form baseline) are one thing here: ``FixedDirections`` around a (K, d) matrix.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("linear", "proj", "ortho", "fc")


class Deformator(nn.Module):
    def __init__(self, kind: str, directions_count: int, latent_dim: int, bias: bool = False,
                 random_init: bool = False, inner_dim: int = 1024, seed: int = 0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"--deformator: {kind!r} is not one of {', '.join(KINDS)}")
        if kind == "ortho" and directions_count != latent_dim:
            raise ValueError(f"--deformator {kind} needs --directions-count equal to the latent size {latent_dim}")
        self.kind, self.directions_count, self.latent_dim = kind, directions_count, latent_dim
        gen = torch.Generator().manual_seed(seed)
        if kind in ("linear", "proj"):
            self.linear = nn.Linear(directions_count, latent_dim, bias=bias)
            with torch.no_grad():
                if random_init:
                    self.linear.weight.copy_(0.1 * torch.randn(latent_dim, directions_count, generator=gen))
                else:
                    self.linear.weight.zero_()
                    m = min(latent_dim, directions_count)
                    self.linear.weight[:m, :m] = torch.eye(m)
                if bias:
                    self.linear.bias.zero_()
        elif kind == "ortho":
            scale = 1.0 if random_init else 0.001
            self.log_mat_half = nn.Parameter(scale * torch.randn(latent_dim, latent_dim, generator=gen))
        elif kind == "fc":
            self.fc1 = nn.Linear(directions_count, inner_dim)
            self.bn1 = nn.BatchNorm1d(inner_dim)
            self.fc2 = nn.Linear(inner_dim, inner_dim)
            self.bn2 = nn.BatchNorm1d(inner_dim)
            self.fc3 = nn.Linear(inner_dim, inner_dim)
            self.bn3 = nn.BatchNorm1d(inner_dim)
            self.fc4 = nn.Linear(inner_dim, latent_dim)

    trainable = True

    def orthogonal_matrix(self) -> torch.Tensor:
        return torch.linalg.matrix_exp(self.log_mat_half - self.log_mat_half.t())

    def forward(self, basis: torch.Tensor) -> torch.Tensor:
        """(B, K) shifts in direction space -> (B, d) latent shifts."""
        if self.kind == "linear":
            return self.linear(basis)
        if self.kind == "proj":
            out = self.linear(basis)
            return out * (basis.norm(dim=1, keepdim=True) / out.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if self.kind == "ortho":
            return F.linear(basis, self.orthogonal_matrix())
        x1 = self.fc1(basis)
        x = F.elu(self.bn1(x1))
        x2 = self.fc2(x)
        x = F.elu(self.bn2(x2 + x1))
        x3 = self.fc3(x)
        x = F.elu(self.bn3(x3 + x2 + x1))
        out = self.fc4(x)
        return out + basis if self.directions_count == self.latent_dim else out


class FixedDirections(nn.Module):
    """A frozen (K, d) direction matrix as a deformator: the baselines' and a frozen run's directions."""

    kind = "fixed"

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix.detach().clone().float())
        self.directions_count, self.latent_dim = matrix.shape
        self.trainable = False

    def forward(self, basis: torch.Tensor) -> torch.Tensor:
        return basis @ self.matrix
