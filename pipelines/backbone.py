"""The text-to-video latent diffusion backbone every method stands on.

It is held as its diffusers components (UNet3DConditionModel, AutoencoderKL, CLIP text encoder and
tokenizer, a noise schedule) rather than a pipeline object: score distillation and adapter sampling
each need the pieces, not a finished sampling loop.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines import model_cache, temporal, tiny
from pipelines.checkpoints import released

# Files a backbone needs from a hub repository (skips duplicated .bin or fp16 copies).
BACKBONE_FILES = [
    "model_index.json",
    "unet/*.json",
    "unet/*.safetensors",
    "vae/*.json",
    "vae/*.safetensors",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "tokenizer/*",
    "scheduler/*",
]

# diffusers' fast, low-memory loading needs `accelerate`; without it diffusers loads the plain way and warns
# on every load. Asking for what is installed keeps the fast path where it exists, without the warning.
LOW_CPU_MEM_USAGE = importlib.util.find_spec("accelerate") is not None

PRESETS = {
    "tiny": lambda: model_cache.build_once(f"tiny-backbone-v{tiny.TINY_VERSION}", tiny.build_backbone),
    "tiny-v": lambda: model_cache.build_once(
        f"tiny-backbone-vpred-v{tiny.TINY_VERSION}",
        functools.partial(tiny.build_backbone, prediction_type="v_prediction"),
    ),
}


def prepare_backbone(ref: str) -> Path:
    """Make the backbone's files available on this node (download or build) and return their directory.

    A released checkpoint's hub id (e.g. `Doubiiu/DynamiCrafter_512`) is converted once per node."""
    if released.is_release(ref):
        return released.backbone_dir(ref)
    return model_cache.resolve(ref, PRESETS, BACKBONE_FILES)


@dataclass(eq=False)
class Backbone:
    ref: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @functools.cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, L, D] as the UNet's cross-attention expects them."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0].to(self.dtype)

    def encode_frames(
        self,
        frames: torch.Tensor,
        sample: bool = False,
        chunk: int = 16,
        generators: list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Video [B, F, 3, H, W] in [-1, 1] -> scaled latents [B, C, F, h, w]; differentiable.

        `sample` draws from the VAE posterior (as score distillation of renders does), element b's
        noise from `generators[b]` when given, so a batched call draws what separate calls would;
        otherwise the posterior mean is used. Frames are encoded `chunk` at a time to bound memory.
        """
        b, f = frames.shape[:2]
        flat = frames.reshape(b * f, *frames.shape[2:]).to(self.device, self.dtype)
        dists = [self.vae.encode(piece).latent_dist for piece in flat.split(chunk)]
        latents = torch.cat([d.mean for d in dists])
        if sample:
            std = torch.cat([d.std for d in dists])
            if generators is None:
                noise = torch.randn_like(std)
            else:
                shape = (f, *std.shape[1:])
                noise = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(std)
            latents = latents + std * noise
        latents = latents * self.vae.config.scaling_factor
        return latents.reshape(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4)

    def decode_latents(self, latents: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Scaled latents [B, C, F, h, w] -> video [B, F, 3, H, W] in [-1, 1]."""
        b, _, f = latents.shape[:3]
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, latents.shape[1], *latents.shape[3:])
        flat = flat.to(self.device, self.dtype) / self.vae.config.scaling_factor
        frames = torch.cat([self.vae.decode(piece).sample for piece in flat.split(chunk)])
        return frames.reshape(b, f, *frames.shape[1:]).clamp(-1, 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0) for per-sample timesteps t [B]."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t].view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def predict(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        text_embeds: torch.Tensor,
        extra_channels: torch.Tensor | None = None,
        **unet_kwargs,
    ) -> torch.Tensor:
        """The UNet's raw output (ε or v, as `prediction_type`); samplers guide and step on it directly.

        `extra_channels` are concatenated to the noisy latents as UNet input (a widened conv_in, e.g.
        DynamiCrafter's condition latents).
        """
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(latents.shape[0])
        sample = latents if extra_channels is None else torch.cat([latents, extra_channels.to(latents)], 1)
        return self.unet(sample.to(self.dtype), t, encoder_hidden_states=text_embeds, **unet_kwargs).sample

    def to_eps(self, output: torch.Tensor, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A raw output as ε: v = √ᾱ ε − √(1−ᾱ) x0 with x_t known gives ε = √ᾱ v + √(1−ᾱ) x_t (no division,
        so it holds at ᾱ = 0 of a zero-terminal-SNR schedule)."""
        if self.prediction_type == "epsilon":
            return output
        if self.prediction_type == "v_prediction":
            abar = self._abar(t, output)
            return abar.sqrt() * output + (1 - abar).sqrt() * latents.to(output.dtype)
        raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output for x_t = √ᾱ x0 + √(1−ᾱ) ε: ε, or v = √ᾱ ε − √(1−ᾱ) x0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            abar = self._abar(t, x0)
            return abar.sqrt() * noise - (1 - abar).sqrt() * x0
        raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        text_embeds: torch.Tensor,
        extra_channels: torch.Tensor | None = None,
        **unet_kwargs,
    ) -> torch.Tensor:
        """The UNet's prediction as ε, whatever the checkpoint was trained to predict (score distillation)."""
        out = self.predict(latents, t, text_embeds, extra_channels, **unet_kwargs)
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(latents.shape[0])
        return self.to_eps(out, latents, t)


def _load_unet(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A UNet3D directory; one whose config names VideoCrafter1's temporal layers (`temporal.CONFIG_KEY`)
    is built with them first and then takes its weights strictly."""
    from diffusers import UNet3DConditionModel
    from safetensors.torch import load_file

    config = UNet3DConditionModel.load_config(path)
    variant = config.get(temporal.CONFIG_KEY)
    if not variant:
        return UNet3DConditionModel.from_pretrained(
            path, torch_dtype=dtype, low_cpu_mem_usage=LOW_CPU_MEM_USAGE
        )
    unet = temporal.apply_variant(UNet3DConditionModel.from_config(config), variant)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state |= load_file(str(file))
    unet.load_state_dict(state, strict=True)
    return unet.to(dtype)


def load_backbone_uncached(ref: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Backbone:
    """A backbone of its own, for methods that modify the UNet (adapters); `load_backbone` shares one."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    path = prepare_backbone(ref)
    try:
        parts = {
            "unet": _load_unet(path / "unet", dtype),
            "vae": AutoencoderKL.from_pretrained(
                path, subfolder="vae", torch_dtype=dtype, low_cpu_mem_usage=LOW_CPU_MEM_USAGE
            ),
            "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype),
        }
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    except (OSError, ValueError, KeyError) as exc:
        raise model_cache.ModelLoadError(f"cannot load backbone {ref!r} from {path}: {exc}") from exc
    for module in parts.values():
        module.to(device).eval().requires_grad_(False)
    return Backbone(
        ref=ref, tokenizer=tokenizer, scheduler=scheduler, device=torch.device(device), dtype=dtype, **parts
    )


@functools.cache
def load_backbone(ref: str = "tiny", device: str = "cpu", dtype: torch.dtype = torch.float32) -> Backbone:
    """The backbone for `ref` (hub id | local dir | tiny | tiny-v), loaded once per process."""
    return load_backbone_uncached(ref, str(device), dtype)
