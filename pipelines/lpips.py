"""LPIPS (Zhang et al. 2018, v0.1, AlexNet trunk) written against the published weight files.

The `lpips` package builds its trunk from torchvision, which cannot be installed on machines with a
CPU-only torch (its PyPI wheel is CUDA-built and breaks `import transformers`). The network is five
convolutions and five 1x1 linear heads, so it is rebuilt here in plain PyTorch and loads the same two
files: torchvision's AlexNet weights and lpips' `weights/v0.1/alex.pth`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# (in, out, kernel, stride, padding, max-pool before) of AlexNet's five convolutions.
_ALEX_CONVS = (
    (3, 64, 11, 4, 2, False),
    (64, 192, 5, 1, 2, True),
    (192, 384, 3, 1, 1, True),
    (384, 256, 3, 1, 1, False),
    (256, 256, 3, 1, 1, False),
)
# torchvision's `features.N` index of each convolution above.
_TORCHVISION_INDEX = (0, 3, 6, 8, 10)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
LIN_FILE = "alex.pth"
TRUNK_GLOB = "alexnet*.pth"


class LPIPS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, p) for i, o, k, s, p, _ in _ALEX_CONVS)
        self.lins = nn.ModuleList(nn.Conv2d(o, 1, 1, bias=False) for _, o, *_ in _ALEX_CONVS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        feats = []
        for conv, (*_, pool_before) in zip(self.convs, _ALEX_CONVS, strict=True):
            if pool_before:
                x = nn.functional.max_pool2d(x, kernel_size=3, stride=2)
            x = torch.relu(conv(x))
            feats.append(x)
        return feats

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance of images [N, 3, H, W] in [-1, 1]."""
        total = torch.zeros(a.shape[0], device=a.device)
        for fa, fb, lin in zip(self._features(a), self._features(b), self.lins, strict=True):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += lin((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total

    @classmethod
    def from_dir(cls, directory: str | Path) -> LPIPS:
        """Load `alex.pth` (lpips heads) and `alexnet*.pth` (torchvision trunk) from `directory`."""
        directory = Path(directory)
        trunks = sorted(directory.glob(TRUNK_GLOB))
        if not (directory / LIN_FILE).exists() or not trunks:
            raise FileNotFoundError(
                f"LPIPS directory {directory} needs {LIN_FILE} (from the lpips package, weights/v0.1/) and "
                f"torchvision's AlexNet weights ({TRUNK_GLOB}, e.g. alexnet-owt-7be5be79.pth)"
            )
        trunk = torch.load(trunks[0], map_location="cpu", weights_only=True)
        heads = torch.load(directory / LIN_FILE, map_location="cpu", weights_only=True)
        state = {}
        for n, index in enumerate(_TORCHVISION_INDEX):
            state[f"convs.{n}.weight"] = trunk[f"features.{index}.weight"]
            state[f"convs.{n}.bias"] = trunk[f"features.{index}.bias"]
            state[f"lins.{n}.weight"] = heads[f"lin{n}.model.1.weight"]
        model = cls()
        model.load_state_dict(state)
        return model.eval()

    def save_dir(self, directory: str | Path) -> None:
        """Write weights in the published file layout (used to make test fixtures and caches)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        trunk, heads = {}, {}
        for n, index in enumerate(_TORCHVISION_INDEX):
            trunk[f"features.{index}.weight"] = self.convs[n].weight.detach().clone()
            trunk[f"features.{index}.bias"] = self.convs[n].bias.detach().clone()
            heads[f"lin{n}.model.1.weight"] = self.lins[n].weight.detach().clone()
        torch.save(trunk, directory / "alexnet-owt-7be5be79.pth")
        torch.save(heads, directory / LIN_FILE)
