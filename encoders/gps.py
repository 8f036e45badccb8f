"""The GPS tower: (lat, lon) in degrees -> embedding in the shared image/GPS space.

GeoCLIP's location-encoder design: equal-earth projection, random Fourier features
at several scales, one MLP per scale, outputs summed. The module names and the
parameter layout (``LocEnc{i}.capsule.{0..6}`` and ``LocEnc{i}.head.0``) match
GeoCLIP's ``location_encoder_weights.pth`` so that file loads as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from encoders.registry import DEFAULT_SIGMAS

# Equal Earth projection constants (Šavrič, Patterson & Jenny 2018) and GeoCLIP's
# scale factor that maps the projected plane to roughly [-1, 1].
_A1, _A2, _A3, _A4 = 1.340264, -0.081106, 0.000893, 0.003796
_SCALE = 66.50336


def equal_earth_projection(latlon: torch.Tensor) -> torch.Tensor:
    """Project (N, 2) degrees (lat, lon) onto the Equal Earth plane, scaled as GeoCLIP does.

    The operation order follows GeoCLIP's exactly: at σ = 256 the Fourier phases
    reach thousands of radians, so a different float32 rounding order would show.
    """
    lat = torch.deg2rad(latlon[:, 0])
    lon = torch.deg2rad(latlon[:, 1])
    sqrt3 = torch.sqrt(torch.tensor(3.0, dtype=latlon.dtype, device=latlon.device))
    theta = torch.asin((sqrt3 / 2) * torch.sin(lat))
    denominator = 3 * (9 * _A4 * theta**8 + 7 * _A3 * theta**6 + 3 * _A2 * theta**2 + _A1)
    x = (2 * sqrt3 * lon * torch.cos(theta)) / denominator
    y = _A4 * theta**9 + _A3 * theta**7 + _A2 * theta**3 + _A1 * theta
    return (torch.stack((x, y), dim=1) * _SCALE) / 180


class FourierFeatures(nn.Module):
    """γ(v) = [cos 2πBv, sin 2πBv] with a fixed Gaussian B ~ N(0, σ²)."""

    def __init__(self, sigma: float, in_features: int = 2, half_width: int = 256) -> None:
        super().__init__()
        # Stored as a frozen Parameter named ``b`` to match GeoCLIP's state dict.
        self.b = nn.Parameter(torch.randn(half_width, in_features) * sigma, requires_grad=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        vp = 2 * np.pi * v @ self.b.T
        return torch.cat((torch.cos(vp), torch.sin(vp)), dim=-1)


class ScaleBranch(nn.Module):
    """Fourier features at one σ followed by an MLP (GeoCLIP's "capsule" + head)."""

    def __init__(self, sigma: float, hidden: int = 1024, out_dim: int = 512, rff: int = 256):
        super().__init__()
        self.sigma = sigma
        self.capsule = nn.Sequential(
            FourierFeatures(sigma, 2, rff),
            nn.Linear(2 * rff, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.capsule(x))


class GPSTower(nn.Module):
    """Location encoder: sum over scales of MLP(RFF_σ(equal_earth(lat, lon)))."""

    def __init__(
        self,
        sigmas: Sequence[float] = DEFAULT_SIGMAS,
        hidden: int = 1024,
        out_dim: int = 512,
        rff: int = 256,
    ) -> None:
        super().__init__()
        if not sigmas:
            raise ValueError("GPSTower needs at least one Fourier scale (sigmas)")
        self.sigmas = tuple(float(s) for s in sigmas)
        self.out_dim = out_dim
        for i, s in enumerate(self.sigmas):
            self.add_module(f"LocEnc{i}", ScaleBranch(s, hidden, out_dim, rff))

    def branches(self) -> list[ScaleBranch]:
        return [getattr(self, f"LocEnc{i}") for i in range(len(self.sigmas))]

    def forward(self, latlon: torch.Tensor) -> torch.Tensor:
        """(N, 2) degrees -> (N, out_dim) unnormalised features."""
        x = equal_earth_projection(latlon)
        out = torch.zeros(latlon.shape[0], self.out_dim, dtype=x.dtype, device=x.device)
        for branch in self.branches():
            out += branch(x)
        return out

    @torch.inference_mode()
    def embed(
        self, latlon: np.ndarray | Sequence[Sequence[float]], batch_size: int = 8192
    ) -> np.ndarray:
        """(N, 2) degrees -> (N, out_dim) float32 unit vectors, in batches."""
        arr = np.asarray(latlon, dtype=np.float32).reshape(-1, 2)
        param = next(self.parameters())
        out = np.empty((arr.shape[0], self.out_dim), dtype=np.float32)
        for start in range(0, arr.shape[0], batch_size):
            chunk = torch.from_numpy(arr[start : start + batch_size]).to(param.device)
            feats = torch.nn.functional.normalize(self(chunk), dim=-1)
            out[start : start + chunk.shape[0]] = feats.float().cpu().numpy()
        return out


def count_gps_flops(tower: GPSTower) -> float:
    """Multiply-adds ×2 per point, for benchmarks and docs."""
    total = 0
    for m in tower.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
    return 2.0 * total
