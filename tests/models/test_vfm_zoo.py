"""Every registered VFM: documented grid/channels at 336 and at a non-square crop, finite features, official
release layouts loading with no missing/unexpected keys, and ProxyCLIP end to end with each family."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovseg
from ovseg.backbones import create_vfm, list_vfms

from ..conftest import TINY_DINO as TINY_VIT
from ..conftest import TINY_SAM, TINY_SD, make_segmenter, tiny_vfm_kwargs

BUILTIN = [n for n in list_vfms()]
tiny_kwargs = tiny_vfm_kwargs


def documented_grid(name, h, w):
    """The grid each family documents (docs/vfms.md), computed independently of the VFM's own grid_size."""
    if name.startswith("sam"):
        return 64, 64
    if name.startswith("sd"):
        def one(n):
            n = n * 2 // 8
            for _ in range(3):
                n = (n + 1) // 2
            return 2 * n
        return one(h), one(w)
    p = int(name.split("_")[1][1:])
    return h // p, w // p


@pytest.mark.parametrize("name", BUILTIN)
def test_feature_grid_and_channels(name):
    vfm = create_vfm(name, "random", model_kwargs=tiny_kwargs(name))
    with torch.inference_mode():
        sq = vfm.forward_features(torch.randn(1, 3, 336, 336))
        ns = vfm.forward_features(torch.randn(2, 3, 224, 392))
    assert sq.shape == (1, vfm.embed_dim) + documented_grid(name, 336, 336)
    assert ns.shape == (2, vfm.embed_dim) + documented_grid(name, 224, 392)
    assert tuple(sq.shape[-2:]) == vfm.grid_size(336, 336) and tuple(ns.shape[-2:]) == vfm.grid_size(224, 392)
    assert torch.isfinite(sq).all() and torch.isfinite(ns).all()
    assert len(vfm.mean) == 3 and len(vfm.std) == 3 and vfm.patch_size >= 1


def test_documented_grids_at_336_full_size_shapes():
    assert documented_grid("dino_b8", 336, 336) == (42, 42)
    assert documented_grid("dinov2_b14_reg", 336, 336) == (24, 24)
    assert documented_grid("mae_b16", 336, 336) == (21, 21)
    assert documented_grid("sd15", 336, 336) == (22, 22)


# ---------------------------------------------------------------- official release layouts
def _dinov2_release(vit):
    """timm state dict -> Meta's DINOv2 release layout (inverse of timm's converter)."""
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    out = {}
    if "reg_token" in sd:
        cls_pos = torch.randn(1, 1, sd["pos_embed"].shape[-1])
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token") - cls_pos[:, 0]
        out["pos_embed"] = torch.cat([cls_pos, sd.pop("pos_embed")], dim=1)
    for k, v in sd.items():
        out[k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3") if "w12" not in k and
            type(vit.blocks[0].mlp).__name__.startswith("SwiGLU") else k] = v
    out["mask_token"] = torch.zeros(1, sd["norm.weight"].shape[0])
    return out


def _sam_release(vit):
    sd = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in vit.state_dict().items()}
    sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    sd["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    return sd


@pytest.mark.parametrize("name", [n for n in BUILTIN if not n.startswith("sd")])
def test_release_layout_loads(name, tmp_path):
    src = create_vfm(name, "random", seed=5, model_kwargs=tiny_kwargs(name))
    if name.startswith("dinov2"):
        ckpt = _dinov2_release(src.vit)
    elif name.startswith("sam"):
        ckpt = _sam_release(src.vit)
    elif name.startswith("mae"):
        ckpt = {"model": {**src.vit.state_dict(), "decoder_embed.weight": torch.zeros(2, 2),
                          "mask_token": torch.zeros(1, 1, 48)}}
    else:
        ckpt = src.vit.state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save(ckpt, path)
    vfm = create_vfm(name, str(path), model_kwargs=tiny_kwargs(name))
    for k, v in src.vit.state_dict().items():
        torch.testing.assert_close(vfm.vit.state_dict()[k], v, msg=lambda m, k=k: f"{k}: {m}")
    x = torch.randn(1, 3, 112, 112)
    with torch.inference_mode():
        torch.testing.assert_close(vfm.forward_features(x), src.forward_features(x))


def _tiny_sd_folder(root):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ovseg.backbones.sd import SD_CONFIGS

    torch.manual_seed(0)
    UNet2DConditionModel(**dict(SD_CONFIGS["sd15"]["unet"], **TINY_SD["unet"])).save_pretrained(root / "unet")
    AutoencoderKL(**dict(SD_CONFIGS["sd15"]["vae"], **TINY_SD["vae"])).save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=10, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "text_encoder")
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt")).save_pretrained(tok_dir)


def test_sd_diffusers_folder_loads_and_gives_the_decoder_stage(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    _tiny_sd_folder(tmp_path)
    vfm = create_vfm("sd15", str(tmp_path))
    assert vfm.prompt_embeds.shape == (1, 77, 32)
    x = torch.rand(1, 3, 336, 336) * 2 - 1
    with torch.inference_mode():
        f = vfm.forward_features(x)
        # independent path: run the UNet to the chosen stage by hand
        lat = vfm.vae.encode(F.interpolate(x, size=(672, 672), mode="bilinear", align_corners=False)
                             ).latent_dist.mode() * vfm.vae.config.scaling_factor
        seen = {}
        up = vfm.unet.up_blocks[0].upsamplers[0]
        def grab(module, args, kwargs):
            seen.setdefault("in", args[0] if args else kwargs["hidden_states"])

        h = up.register_forward_pre_hook(grab, with_kwargs=True)
        vfm.unet(lat, 0, encoder_hidden_states=vfm.prompt_embeds)
        h.remove()
    assert f.shape == (1, 64, 22, 22)
    assert seen["in"].shape[-2:] == (11, 11)
    torch.testing.assert_close(f, up.conv(F.interpolate(seen["in"], scale_factor=2.0, mode="nearest")))
    assert len(up._forward_pre_hooks) == 0  # no hooks left behind


def test_sd_single_file_must_be_safetensors(tmp_path):
    pytest.importorskip("diffusers")
    p = tmp_path / "sd.ckpt"
    p.write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors"):
        create_vfm("sd15", str(p))


def test_missing_optional_package_fails_before_download(monkeypatch):
    import ovseg._registry as reg

    monkeypatch.setattr(reg, "require", lambda m, e, what="": (_ for _ in ()).throw(
        ImportError(f'{what} needs the optional package \'{m}\'. Install it with: pip install "ovseg[{e}]"')))
    with pytest.raises(ImportError, match=r'pip install "ovseg\[sd\]"'):
        create_vfm("sd15")


def test_missing_optional_package_real_check(monkeypatch):
    import ovseg._deps as deps

    monkeypatch.setattr(deps.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"vfm 'sd21' needs the optional package 'diffusers'.*ovseg\[sd\]"):
        create_vfm("sd21")


@torch.inference_mode()
def test_dinov2_reg_uses_antialiased_positions_and_drops_registers():
    vfm = create_vfm("dinov2_b14_reg", "random", model_kwargs=TINY_VIT)
    vit = vfm.vit
    x = torch.randn(1, 3, 336, 336)
    pos = vit.pos_embed[0].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(24, 24), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 576, -1)
    t = vit.patch_embed(x).flatten(1, 2) + pos
    t = torch.cat([vit.cls_token, vit.reg_token, t], 1)
    t = vit.norm(vit.blocks(t))
    assert t.shape[1] == 1 + 4 + 576
    torch.testing.assert_close(vfm.forward_features(x).flatten(2).transpose(1, 2), t[:, 5:])


@torch.inference_mode()
def test_mae_features_equal_timm_forward_at_224():
    vfm = create_vfm("mae_b16", "random", model_kwargs=TINY_VIT)
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(vfm.forward_features(x).flatten(2).transpose(1, 2), vfm.vit.forward_features(x)[:, 1:])


@torch.inference_mode()
def test_sam_stretches_the_crop_to_1024():
    vfm = create_vfm("sam_b16", "random", model_kwargs=TINY_SAM)
    x = torch.randn(1, 3, 224, 392)
    ref = vfm.vit.forward_features(F.interpolate(x, size=(1024, 1024), mode="bilinear", align_corners=False))
    torch.testing.assert_close(vfm.forward_features(x), ref)


@pytest.mark.parametrize("name", ["dinov2_s14_reg", "mae_b16", "sam_b16", "sd21"])
def test_proxyclip_end_to_end_with_each_family(name, rgb_image):
    seg = make_segmenter("proxyclip", vfm=name, vfm_kwargs={"model_kwargs": tiny_kwargs(name)})
    grids = []
    orig = seg.clip.forward_last_block
    seg.clip.forward_last_block = lambda *a, **k: (lambda r: grids.append(r[1]) or r)(orig(*a, **k))
    res = seg.predict(rgb_image, ["cat", "sofa; couch", "floor"], return_probs=True)
    assert res.label_map.shape == rgb_image.shape[:2] and np.isfinite(res.probs).all()
    assert set(grids) == {documented_grid(name, 336, 336)}  # the output lives on the VFM grid


def test_import_does_not_pull_optional_packages():
    import subprocess
    import sys

    code = "import sys, ovseg; print([m for m in ('diffusers', 'transformers') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    assert {"sd15", "sd21", "sam_b16", "mae_h14", "dinov2_g14_reg"} <= set(ovseg.list_vfms())


def test_vfm_configs_take_release_files_and_statistics_from_timm():
    import timm

    from ovseg.backbones import get_vfm_cfg

    checked = 0
    for name in list_vfms():
        cfg = get_vfm_cfg(name)
        assert cfg is not None, f"{name} has no typed configuration"
        r = cfg.resolved()
        if cfg.timm_name:
            pre = timm.models.get_pretrained_cfg(cfg.timm_name)
            assert (r.release_url, r.mean, r.std) == (pre.url, tuple(pre.mean), tuple(pre.std)), name
            assert cfg.release_url is None and cfg.mean is None  # nothing copied by hand
            checked += 1
    assert checked >= 18
    files = {n: get_vfm_cfg(n).resolved().release_file for n in ("dino_b8", "dinov2_b14_reg", "sam_b16", "mae_b16")}
    assert files == {"dino_b8": "dino_vitbase8_pretrain.pth", "dinov2_b14_reg": "dinov2_vitb14_reg4_pretrain.pth",
                     "sam_b16": "sam_vit_b_01ec64.pth", "mae_b16": "mae_pretrain_vit_base.pth"}
    sd = get_vfm_cfg("sd15").resolved()
    assert sd.mean == sd.std == (0.5, 0.5, 0.5) and sd.hub_repo == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    built = create_vfm("dino_b8", "random", model_kwargs=tiny_kwargs("dino_b8"))
    assert (tuple(built.mean), tuple(built.std)) == (get_vfm_cfg("dino_b8").resolved().mean,
                                                     get_vfm_cfg("dino_b8").resolved().std)


def test_sam_encoder_uses_the_release_layernorm_eps():
    """Meta's SAM image encoder normalises with eps 1e-6 everywhere; timm's samvit constructor defaults to 1e-5,
    which moves SAM's features by ~0.7 % on the same weights."""
    vfm = create_vfm("sam_b16", "random", model_kwargs=TINY_SAM)
    norms = [m for m in vfm.modules() if isinstance(m, torch.nn.LayerNorm) or type(m).__name__ == "LayerNorm2d"]
    assert norms and {m.eps for m in norms} == {1e-6}
