"""Small checkpoints in the released files' key layout, for converter tests.

The UNet and Resampler weights are the official-code oracles' (`fixtures/official/`); the VAE and the
OpenCLIP towers are random tensors under the key names the official modules register (LDM
AutoencoderKL; OpenCLIP text and visual transformers), sized small. The names follow the module
structure of the released configs, so a converter that handles these handles the released files.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from diffusers import DDIMScheduler
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CONTEXT_WIDTH, IMAGE_WIDTH = 96, 80  # the oracles' UNet context_dim and Resampler embedding_dim


def _random(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
    scale = 1 / fan_in**0.5 if len(shape) > 1 else 0.1
    return torch.randn(shape, generator=generator) * scale


def _norm(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def ldm_vae_shapes(ch: int = 32, mult: tuple[int, ...] = (1, 2), blocks: int = 1, z: int = 4) -> dict:
    """Keys and shapes of an LDM AutoencoderKL (`ae_modules.Encoder` / `Decoder`, attn_resolutions [])."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, cin: int, cout: int, k: int = 3) -> None:
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (cout, cin, k, k), (cout,)

    def resblock(prefix: str, cin: int, cout: int) -> None:
        shapes.update(_norm(f"{prefix}.norm1", cin))
        conv(f"{prefix}.conv1", cin, cout)
        shapes.update(_norm(f"{prefix}.norm2", cout))
        conv(f"{prefix}.conv2", cout, cout)
        if cin != cout:
            conv(f"{prefix}.nin_shortcut", cin, cout, 1)

    def mid(prefix: str, c: int) -> None:
        resblock(f"{prefix}.block_1", c, c)
        shapes.update(_norm(f"{prefix}.attn_1.norm", c))
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.attn_1.{name}", c, c, 1)
        resblock(f"{prefix}.block_2", c, c)

    widths = [ch * m for m in mult]
    e = "first_stage_model.encoder"
    conv(f"{e}.conv_in", 3, ch)
    cin = ch
    for i, cout in enumerate(widths):
        for j in range(blocks):
            resblock(f"{e}.down.{i}.block.{j}", cin, cout)
            cin = cout
        if i != len(widths) - 1:
            conv(f"{e}.down.{i}.downsample.conv", cout, cout)
    mid(f"{e}.mid", cin)
    shapes.update(_norm(f"{e}.norm_out", cin))
    conv(f"{e}.conv_out", cin, 2 * z)
    d = "first_stage_model.decoder"
    conv(f"{d}.conv_in", z, widths[-1])
    mid(f"{d}.mid", widths[-1])
    cin = widths[-1]
    for i in reversed(range(len(widths))):  # `up` is stored in resolution order
        for j in range(blocks + 1):
            resblock(f"{d}.up.{i}.block.{j}", cin, widths[i])
            cin = widths[i]
        if i != 0:
            conv(f"{d}.up.{i}.upsample.conv", cin, cin)
    shapes.update(_norm(f"{d}.norm_out", cin))
    conv(f"{d}.conv_out", cin, 3)
    conv("first_stage_model.quant_conv", 2 * z, 2 * z, 1)
    conv("first_stage_model.post_quant_conv", z, z, 1)
    return shapes


def openclip_blocks(prefix: str, width: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        p = f"{prefix}transformer.resblocks.{i}"
        shapes |= _norm(f"{p}.ln_1", width) | _norm(f"{p}.ln_2", width)
        shapes[f"{p}.attn.in_proj_weight"] = (3 * width, width)
        shapes[f"{p}.attn.in_proj_bias"] = (3 * width,)
        shapes[f"{p}.attn.out_proj.weight"], shapes[f"{p}.attn.out_proj.bias"] = (width, width), (width,)
        shapes[f"{p}.mlp.c_fc.weight"], shapes[f"{p}.mlp.c_fc.bias"] = (4 * width, width), (4 * width,)
        shapes[f"{p}.mlp.c_proj.weight"], shapes[f"{p}.mlp.c_proj.bias"] = (width, 4 * width), (width,)
    return shapes


def openclip_text_shapes(prefix: str, vocab: int, width: int = CONTEXT_WIDTH, layers: int = 3) -> dict:
    """FrozenOpenCLIPEmbedder's state: the text transformer (its visual tower deleted)."""
    return openclip_blocks(prefix, width, layers) | {
        f"{prefix}positional_embedding": (77, width),
        f"{prefix}text_projection": (width, width),
        f"{prefix}logit_scale": (),
        f"{prefix}token_embedding.weight": (vocab, width),
        **_norm(f"{prefix}ln_final", width),
    }


def openclip_image_embedder_shapes(vocab: int, width: int = IMAGE_WIDTH, layers: int = 2) -> dict:
    """FrozenOpenCLIPImageEmbedderV2's state: the visual tower, plus the text side it keeps."""
    v = "embedder.model.visual."
    text_side = {
        k: s
        for k, s in openclip_text_shapes("embedder.model.", vocab, CONTEXT_WIDTH, 0).items()
        if "resblocks" not in k
    }
    return (
        openclip_blocks(v, width, layers)
        | text_side
        | {
            f"{v}class_embedding": (width,),
            f"{v}conv1.weight": (width, 3, 14, 14),
            f"{v}positional_embedding": (5, width),  # 28x28 images: 2x2 patches + CLS
            f"{v}proj": (width, CONTEXT_WIDTH),
            **_norm(f"{v}ln_pre", width),
            **_norm(f"{v}ln_post", width),
        }
    )


def schedule_buffers(zero_snr: bool, prediction: str, base_scale: float | None) -> dict[str, torch.Tensor]:
    """The DDPM buffers of the official module (values that matter: betas, alphas_cumprod, scale_arr)."""
    s = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=zero_snr,
        prediction_type=prediction,
    )
    abar = s.alphas_cumprod
    prev = torch.cat([torch.ones(1), abar[:-1]])
    out = {"betas": s.betas, "alphas_cumprod": abar, "alphas_cumprod_prev": prev}
    for name in (
        "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
        "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    ):  # fmt: skip
        out[name] = torch.zeros(1000)
    if base_scale is not None:
        ramp = torch.linspace(1.0, base_scale, 400)
        out["scale_arr"] = torch.cat([ramp, torch.full((1000,), base_scale)])
    return out


def small_dynamicrafter(vocab: int, gated: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small DynamiCrafter checkpoint state dict: the oracle UNet (512 mode, or the 256 gated one)."""
    g = torch.Generator().manual_seed(seed)
    name = "dc_small_unet_gated" if gated else "dc_small_unet"
    unet = load_file(str(FIXTURES / f"{name}.safetensors"))
    resampler = load_file(str(FIXTURES / "dc_small_resampler.safetensors"))
    state = {k: v for k, v in {**unet, **resampler}.items() if k.startswith(("model.", "image_proj_model."))}
    shapes = ldm_vae_shapes() | openclip_text_shapes("cond_stage_model.model.", vocab)
    shapes |= openclip_image_embedder_shapes(vocab)
    state |= {k: _random(s, g) for k, s in shapes.items()}
    if gated:
        return state | schedule_buffers(False, "epsilon", None)
    return state | schedule_buffers(True, "v_prediction", 0.7)


def small_config(gated: bool = False) -> dict:
    """An official-style inference YAML (model.params) for `small_dynamicrafter`'s architecture."""
    name = "dc_small_unet_gated" if gated else "dc_small_unet"
    unet = yaml.safe_load((FIXTURES / f"{name}.json").read_text())
    resampler = yaml.safe_load((FIXTURES / "dc_small_resampler.json").read_text())
    return {
        "model": {
            "params": {
                "unet_config": {"params": unet["config"]},
                "image_proj_stage_config": {"params": resampler["config"]},
            }
        }
    }


# -- VideoCrafter1 and StyleCrafter ---------------------------------------------------------------


def _vc1_oracle() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "vc1_small_unet.safetensors"))


def small_videocrafter1(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small VideoCrafter1 `model.ckpt` state dict: the oracle's base UNet, a VAE, the text tower."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in _vc1_oracle().items() if k.startswith("model.diffusion_model.")}
    shapes = ldm_vae_shapes() | openclip_text_shapes("cond_stage_model.model.", vocab)
    state |= {k: _random(s, g) for k, s in shapes.items()}
    return state | schedule_buffers(False, "epsilon", None)


def small_stylecrafter_files() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The oracle's `adapter_v1.pth` (flat) and `temporal_v1_1.pth` (nested) contents."""
    oracle = _vc1_oracle()
    adapter = {k.removeprefix("adapter."): v for k, v in oracle.items() if k.startswith("adapter.")}
    temporal: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in oracle.items():
        if key.startswith("temporal/"):
            _, outer, inner = key.split("/")
            temporal.setdefault(outer, {})[inner] = tensor
    return adapter, temporal


def small_vc1_config() -> dict:
    """An official-style StyleCrafter inference YAML for the oracle's small VideoCrafter1 and adapter."""
    spec = yaml.safe_load((FIXTURES / "vc1_small_unet.json").read_text())
    return {
        "model": {
            "params": {
                "unet_config": {"params": spec["unet_config"]},
                "adapter_config": {"params": spec["adapter_config"]["params"]},
            }
        }
    }
