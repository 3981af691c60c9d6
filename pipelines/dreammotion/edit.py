"""DreamMotion: edit a video's appearance by score distillation while keeping its structure and motion.

The edited latent video x(θ) starts as the source's VAE latents x̂ and is optimized directly (no
inversion, no sampling). Each iteration draws one timestep and one noise shared by both videos and:
- V-DDS: pushes x along m ⊙ (ε_cfg(x_t, y) − ε_cfg(x̂_t, ŷ)) without the UNet Jacobian, m the per-frame
  masks at latent resolution, so only the masked object takes the target prompt's appearance;
- S-SSM and T-SSM: match the spatial and temporal self-similarity of decoder self-attention keys of x_t
  to those of x̂_t (detached), both under the target prompt, back-propagated through the UNet into x,
  which keeps the source's layout and motion. (The paper does not say which prompt conditions the
  source keys; with the same prompt the terms see only the videos' difference.)

Where the paper (no official code) is silent, the defaults follow the DDS/CDS code of the same lab; see
`EditParams`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import media
from pipelines.distill import dds_gradient, sample_noise, sample_timesteps
from pipelines.dreammotion.ssm import AUTO, KeyRecorder, s_ssm, spatial_key_layers, t_ssm
from pipelines.params import from_values


@dataclass(frozen=True)
class EditParams:
    """Hyperparameters. [paper] = stated by the paper's write-ups; [DDS] = DDS/CDS code default; [ours]."""

    steps: int = 200  # [paper] 200 iterations
    num_frames: int = 16  # [paper] 8–16 frames with ZeroScope
    # [ours] which frames: num_frames consecutive ones from start_frame, frame_stride apart, at the clip's
    # own rate (as video-editing methods take clips); a long clip is edited window by window.
    start_frame: int = 0
    frame_stride: int = 1
    height: int = 320  # [paper] ZeroScope 576×320
    width: int = 576
    seed: int = 0
    lr: float = 0.4  # [paper, one write-up] SGD, lr 0.4
    # The surrogate V-DDS loss is scaled by loss_scale / (h·w) of the latent, as DDS/CDS do [DDS].
    loss_scale: float = 2000.0
    guidance: float = 7.5  # [DDS] CFG scale, empty-prompt unconditional
    t_min: int = 50  # [DDS] t uniform on {t_min, …, t_max − 2}, as randint(50, 949)
    t_max: int = 950
    lambda_s: float = 1.0  # [ours] weights of S-SSM and T-SSM: not recovered from the paper
    lambda_t: float = 1.0
    ssm_layers: str = AUTO  # comma-separated module-name prefixes, or auto (first attention up block)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EditParams:
        """The known keys of `values`, type-checked; the rest ignored."""
        params = from_values(cls, values)
        if params.steps < 0 or params.num_frames < 1 or not 0 <= params.t_min < params.t_max - 1:
            raise ValueError("need steps >= 0, num_frames >= 1 and 0 <= t_min < t_max - 1")
        if params.start_frame < 0 or params.frame_stride < 1:
            raise ValueError("need start_frame >= 0 and frame_stride >= 1")
        return params

    def frame_indices(self, total: int) -> np.ndarray:
        """The clip's frames this edit takes, of `total`; ValueError when the clip is too short."""
        return media.strided_indices(total, self.num_frames, self.start_frame, self.frame_stride)

    def layer_prefixes(self) -> list[str] | str:
        return (
            AUTO if self.ssm_layers == AUTO else [p.strip() for p in self.ssm_layers.split(",") if p.strip()]
        )


@dataclass
class Edit:
    frames: torch.Tensor  # [F, 3, H, W] in [-1, 1], the decoded edit
    latents: torch.Tensor  # [1, C, F, h, w]
    seconds_per_step: float
    losses: dict[str, float] = field(default_factory=dict)  # the last step's terms


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-frame masks [F, H, W] (bool) -> [1, 1, F, h, w] float: a latent cell is edited if any pixel is."""
    cells = F.adaptive_max_pool2d(mask.float()[:, None], size)
    return cells[:, 0][None, None]


def edit_video(
    model: Any,
    source: torch.Tensor,
    source_prompt: str,
    target_prompt: str,
    params: EditParams,
    mask: torch.Tensor | None = None,
) -> Edit:
    """Edit `source` (frames [F, 3, H, W] in [-1, 1]) from `source_prompt` to `target_prompt`.

    `model` is a backbone (pipelines.backbone.Backbone); `mask` [F, H, W] bool marks what may change
    (None: everything).
    """
    device = model.alphas_cumprod.device
    generator = torch.Generator().manual_seed(params.seed)
    with torch.no_grad():
        x_source = model.encode_frames(source[None].to(device)).float()
    x = x_source.clone().requires_grad_(True)
    m = latent_mask(mask.to(device), x.shape[-2:]) if mask is not None else torch.ones_like(x[:, :1])
    embeds = model.encode_prompt([target_prompt, source_prompt, ""])
    target_embeds, source_embeds, uncond = embeds[0:1], embeds[1:2], embeds[2:3]
    guidance = torch.tensor([params.guidance], device=device)
    scale = params.loss_scale / (x.shape[-2] * x.shape[-1])
    optimizer = torch.optim.SGD([x], lr=params.lr)
    use_ssm = params.lambda_s > 0 or params.lambda_t > 0
    recorder = (
        KeyRecorder(model.unet, spatial_key_layers(model.unet, params.layer_prefixes())) if use_ssm else None
    )
    num_train = len(model.alphas_cumprod)
    losses: dict[str, float] = {}
    start = time.perf_counter()
    try:
        for _ in range(params.steps):
            t = sample_timesteps([generator], [(params.t_min, min(params.t_max, num_train) - 1)], device)
            noise = sample_noise([generator], tuple(x.shape[1:]), device)
            optimizer.zero_grad(set_to_none=True)
            delta = dds_gradient(model, x, x_source, target_embeds, source_embeds, uncond, guidance, t, noise)
            loss = scale * (x * (m * delta)).sum()
            if recorder is not None:
                # Keys of the edited and the source video under the same (target) prompt, so the terms
                # measure only how the videos differ: both are 0 while x = x̂.
                noisy = model.add_noise(torch.cat([x, x_source]), torch.cat([noise, noise]).to(x.dtype), t)
                with recorder.recording(stop_after_last=True) as keys:
                    model.predict_noise(noisy, t.repeat(2), target_embeds.expand(2, -1, -1))
                halves = {n: k.unflatten(0, (2, -1)) for n, k in keys.items()}
                spatial = sum(s_ssm(k[0], k[1]) for k in halves.values()) / len(halves)
                temporal = sum(t_ssm(k[0], k[1]) for k in halves.values()) / len(halves)
                loss = loss + params.lambda_s * spatial + params.lambda_t * temporal
                losses = {"s_ssm": spatial.item(), "t_ssm": temporal.item()}
            loss.backward()
            optimizer.step()
    finally:
        if recorder is not None:
            recorder.remove()
    seconds_per_step = (time.perf_counter() - start) / max(params.steps, 1)
    with torch.no_grad():
        frames = model.decode_latents(x.detach().to(model.dtype))[0].float()
    return Edit(frames=frames, latents=x.detach(), seconds_per_step=seconds_per_step, losses=losses)
