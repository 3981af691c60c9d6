"""Tiny random models built from configs, for tests and the demo on machines without weights.

They are seeded, so every process and node builds identical weights, and they are saved in the
standard diffusers/transformers layout, so they load through the same `from_pretrained` calls as
real checkpoints. Their outputs mean nothing; they prove that tensors flow and code paths run.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# Bump when a tiny config changes, so stale caches are not reused.
TINY_VERSION = 1
TOKENIZER_MAX_LENGTH = 77
TEXT_WIDTH = 32

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def write_tokenizer(path: Path) -> None:
    """A CLIP BPE tokenizer whose vocabulary is single printable characters and no merges.

    Words become one token per character, which is all a random text encoder needs; the files are
    the real CLIP tokenizer format, so `CLIPTokenizer.from_pretrained` reads them unchanged.
    """
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens = [*chars, *(c + "</w>" for c in chars), _BOS, _EOS]
    tokenizer = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[],
        model_max_length=TOKENIZER_MAX_LENGTH,
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_EOS,
        pad_token=_EOS,
    )
    tokenizer.save_pretrained(path)


def _special_ids(path: Path) -> dict[str, int]:
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    return {
        "vocab_size": len(vocab),
        "bos_token_id": vocab[_BOS],
        "eos_token_id": vocab[_EOS],
        "pad_token_id": vocab[_EOS],
    }


def tiny_text_config(ids: dict[str, int]) -> dict:
    return dict(
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        **ids,
    )


def build_backbone(path: Path, prediction_type: str = "epsilon") -> None:
    """A T2V backbone: UNet3D, VAE (8x downsampling, like real ones), CLIP text encoder, DDIM schedule."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    write_tokenizer(path / "tokenizer")
    torch.manual_seed(0)
    UNet3DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    ).save_pretrained(path / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ).save_pretrained(path / "vae")
    CLIPTextModel(CLIPTextConfig(**tiny_text_config(_special_ids(path / "tokenizer")))).save_pretrained(
        path / "text_encoder"
    )
    # The schedule of ModelScope T2V / VideoCrafter: scaled-linear betas, 1000 steps.
    DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    ).save_pretrained(path / "scheduler")


def build_clip(
    path: Path, image_size: int = 32, width: int = TEXT_WIDTH, layers: int = 2, patch_size: int | None = None
) -> None:
    """CLIP with tokenizer and image processor; `image_size`, `width`, `layers`, `patch_size` scale it up
    for benches (ViT-L/14: 224, 1024, 24, 14)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    write_tokenizer(path)
    torch.manual_seed(0)
    text = tiny_text_config(_special_ids(path))
    text.update(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers)
    vision = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size or max(image_size // 8, 2),
    )
    config = CLIPConfig(
        text_config=CLIPTextConfig(**text).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=max(width // 2, 16),
    )
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    ).save_pretrained(path)


def build_modelscope_size(path: Path) -> None:
    """ModelScope T2V's (and ZeroScope's) component shapes with random weights, to time real-size work.

    diffusers' UNet3D defaults are ModelScope's; weights are saved in fp16 (2.8 GB for the UNet)."""
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    build_backbone(path)  # tokenizer, scheduler and small parts, replaced below
    ids = _special_ids(path / "tokenizer")
    UNet3DConditionModel(cross_attention_dim=1024, attention_head_dim=64).to(torch.float16).save_pretrained(
        path / "unet"
    )
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
    ).to(torch.float16).save_pretrained(path / "vae")
    text = CLIPTextConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", **ids,
    )  # fmt: skip
    CLIPTextModel(text).to(torch.float16).save_pretrained(path / "text_encoder")
