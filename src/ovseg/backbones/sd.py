"""Stable Diffusion UNet features (ProxyCLIP supplement §A, Table 2; docs/vfms.md) via diffusers.

The crop (normalised to [-1, 1]) is resized to 2x (336 -> 672), encoded by the VAE (latent mean x scaling
factor), and the UNet runs at timestep 0 conditioned on the empty prompt. Features are the decoder stage
``up_blocks[block]`` after its 2x upsampler: for ``block=0`` the 1280-channel map that the supplement reports
as 22x22 for a 672 input (a downsampling factor of ~15.3). diffusers would upsample to the skip connection's
size (21x21 here), so ovseg applies the stage's upsampler with a plain 2x, as the original LDM code does;
the UNet stops there. diffusers and transformers are imported only when an SD VFM is built
(``pip install "ovseg[sd]"``).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InvalidInputError
from ..weights import check_hub_reachable, download_errors, downloading, offline_mode, parse_weights, seeded
from .base import VFM, VFMCfg, register_vfm

logger = logging.getLogger(__name__)

__all__ = ["SDFeatures", "build_sd", "SD_CONFIGS"]

_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD_CONFIGS: Dict[str, Dict[str, Any]] = {
    "sd15": dict(repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
                 unet=dict(_UNET, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
                 vae=dict(_VAE, sample_size=512)),
    "sd21": dict(repo_id="stabilityai/stable-diffusion-2-1",
                 unet=dict(_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                           use_linear_projection=True),
                 vae=dict(_VAE, sample_size=768)),
}


class _Stop(Exception):
    pass


class SDFeatures(VFM):
    """VAE encoder + UNet decoder-stage features."""

    mean = (0.5, 0.5, 0.5)  # the VAE takes [-1, 1]
    std = (0.5, 0.5, 0.5)

    def __init__(self, vae: nn.Module, unet: nn.Module, prompt_embeds: torch.Tensor, *, block: int = 0,
                 scale: float = 2.0, name: str = "sd"):
        super().__init__()
        if not 0 <= block < len(unet.up_blocks) or unet.up_blocks[block].upsamplers is None:
            last = len(unet.up_blocks) - 2
            raise InvalidInputError(f"{name}: block must index an up block with an upsampler (0..{last}), got {block}")
        self.vae, self.unet = vae, unet
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)  # (1, 77, D) empty prompt
        self.block, self.scale, self.name = block, float(scale), name
        self.embed_dim = int(unet.config.block_out_channels[::-1][block])
        n_down = sum(1 for b in unet.down_blocks if b.downsamplers is not None)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._down = n_down - block  # UNet downsamplings still undone at the chosen stage (before its upsampler)
        self.patch_size = max(1, round(self.vae_factor * 2 ** (self._down - 1) / self.scale))

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        def one(n: int) -> int:
            n = int(n * self.scale) // self.vae_factor
            for _ in range(self._down):
                n = (n + 1) // 2  # conv stride 2, padding 1
            return n * 2
        return one(height), one(width)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.interpolate(x, size=(int(h * self.scale), int(w * self.scale)), mode="bilinear", align_corners=False)
        latents = self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor
        captured = {}
        up = self.unet.up_blocks[self.block].upsamplers[0]

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured["f"] = module.forward(hidden)  # plain 2x (no output_size), as LDM; .forward skips this hook
            raise _Stop

        handle = up.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            cond = self.prompt_embeds.to(latents.dtype).expand(latents.shape[0], -1, -1)
            self.unet(latents, 0, encoder_hidden_states=cond)
        except _Stop:
            pass
        finally:
            handle.remove()  # never accumulate hooks
        return captured["f"]


def _components_from_pretrained(source: str, cache_dir: Optional[str] = None, local_files_only: bool = False):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw: Dict[str, Any] = dict(cache_dir=cache_dir) if cache_dir else {}
    if local_files_only:
        kw["local_files_only"] = True
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kw)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw)
    tok = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
    text = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw)
    return vae, unet, tok, text


def _from_hub(repo_id: str, vfm_name: str, cache_dir: Optional[str] = None):
    """The four components from the Hugging Face cache without network when they are all there; otherwise one
    connection check (no retries) and then diffusers' download. Only download/IO failures become the
    WeightsUnavailableError."""
    try:
        return _components_from_pretrained(repo_id, cache_dir, local_files_only=True)
    except download_errors():  # not (completely) cached
        pass
    load = (f'Segmenter("proxyclip", vfm="{vfm_name}", vfm_weights=PATH) '
            f"(CLI: --vfm {vfm_name} --vfm-weights PATH)")
    fetch = (f"the repo's vae/, unet/, text_encoder/ and tokenizer/ folders from https://huggingface.co/{repo_id} "
             f"(hf download {repo_id} --local-dir PATH; older huggingface_hub: huggingface-cli download)")
    with downloading(f"VFM '{vfm_name}' (Hugging Face repo '{repo_id}')", fetch=fetch, load=load,
                     cache_dir=cache_dir):
        if offline_mode():
            raise FileNotFoundError(f"{repo_id} is not (completely) in the Hugging Face cache")
        check_hub_reachable(repo_id, "model_index.json")
        logger.info("downloading %s from the Hugging Face hub", repo_id)
        return _components_from_pretrained(repo_id, cache_dir)


@torch.no_grad()
def _empty_prompt(tokenizer, text_encoder) -> torch.Tensor:
    length = int(text_encoder.config.max_position_embeddings)  # 77 for SD's CLIP text encoders
    ids = tokenizer([""], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0].detach()  # (1, 77, D)


def build_sd(*, cfg: VFMCfg, weights: Any = None, seed: int = 0, model_kwargs: Optional[Dict[str, Any]] = None,
             block: int = 0, scale: float = 2.0) -> SDFeatures:
    """``weights``: None (the hub repository of ``cfg``), a local diffusers folder, a single-file ``.safetensors``
    checkpoint, or ``"random"`` (``model_kwargs={"unet": {...}, "vae": {...}}`` override the configs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    repo_id, unet, vae, vfm_name = cfg.options["repo_id"], cfg.options["unet"], cfg.options["vae"], cfg.name

    model_kwargs = dict(model_kwargs or {})
    src = parse_weights(weights, option="vfm_weights", what=f"VFM '{vfm_name}'")
    unknown = sorted(set(model_kwargs) - {"unet", "vae"})
    if unknown:
        raise InvalidInputError(f"model_kwargs of VFM '{vfm_name}' take 'unet' and 'vae' config overrides; got "
                                f"{unknown}")
    if model_kwargs and src.kind != "random":
        raise InvalidInputError(f"model_kwargs of VFM '{vfm_name}' only apply to vfm_weights='random' (pretrained "
                                "components come with their own configs)")
    if src.kind == "random":
        ucfg = dict(unet, **model_kwargs.get("unet", {}))
        vcfg = dict(vae, **model_kwargs.get("vae", {}))
        with seeded(seed):
            vae_m = AutoencoderKL(**vcfg)
            unet_m = UNet2DConditionModel(**ucfg)
            prompt = torch.randn(1, 77, ucfg["cross_attention_dim"])
    else:
        if src.kind == "default":
            vae_m, unet_m, tok, text = _from_hub(repo_id, vfm_name)
        elif src.path.is_dir():
            vae_m, unet_m, tok, text = _components_from_pretrained(str(src.path))
        else:
            if src.path.suffix != ".safetensors":
                raise InvalidInputError(f"vfm_weights '{weights}': single-file SD checkpoints must be .safetensors "
                                        "(pickled .ckpt files are not loaded); or pass a diffusers folder")
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_single_file(str(src.path))
            vae_m, unet_m, tok, text = pipe.vae, pipe.unet, pipe.tokenizer, pipe.text_encoder
        prompt = _empty_prompt(tok, text)
        del text
    vae_m.decoder = None  # only the encoder is used
    return SDFeatures(vae_m.eval(), unet_m.eval(), prompt, block=block, scale=scale, name=vfm_name)


for _name, _cfg in SD_CONFIGS.items():
    register_vfm(VFMCfg(_name, build_sd, requires=(("diffusers", "sd"), ("transformers", "sd")),
                        doc=f"Stable Diffusion {_name[2]}.{_name[3]} UNet decoder features (1280 ch, 22x22 at 336)",
                        mean=SDFeatures.mean, std=SDFeatures.std, options=_cfg))
