"""DINO VFM via timm: grid/channels, positional interpolation, release-format checkpoints, clear errors."""
import pytest
import torch

from ovseg.backbones import create_vfm, list_vfms
from ovseg.pos_embed import interpolate_pos_embed
from ovseg.weights import WeightsUnavailableError

from ..conftest import TINY_DINO


@pytest.mark.parametrize("name,patch", [("dino_b8", 8), ("dino_s16", 16)])
def test_feature_grid_square_and_non_square(name, patch):
    vfm = create_vfm(name, "random", model_kwargs=TINY_DINO)
    assert (vfm.patch_size, vfm.embed_dim) == (patch, 48)
    with torch.inference_mode():
        f = vfm.forward_features(torch.randn(2, 3, 336, 336))
        g = vfm.forward_features(torch.randn(1, 3, 224, 392))
    assert f.shape == (2, 48, 336 // patch, 336 // patch) and torch.isfinite(f).all()
    assert g.shape == (1, 48, 224 // patch, 392 // patch) and torch.isfinite(g).all()


@torch.inference_mode()
def test_features_are_last_block_normed_patch_tokens():
    vfm = create_vfm("dino_b8", "random", model_kwargs=TINY_DINO)
    vit = vfm.vit
    x = torch.randn(1, 3, 224, 224)  # base grid: timm's own forward applies unchanged
    ref = vit.forward_features(x)  # (1, 1+N, C), final norm applied
    f = vfm.forward_features(x)
    torch.testing.assert_close(f.flatten(2).transpose(1, 2), ref[:, 1:])
    # at 336 the positional table is resized with DINO's scale-factor rule
    x = torch.randn(1, 3, 336, 336)
    pos = vit.pos_embed[0]
    table = torch.cat([pos[:1], interpolate_pos_embed(pos[1:], (28, 28), (42, 42))])[None]
    t = vit.patch_embed(x).flatten(1, 2)
    t = torch.cat([vit.cls_token, t], 1) + table
    t = vit.norm(vit.blocks(t))
    torch.testing.assert_close(vfm.forward_features(x).flatten(2).transpose(1, 2), t[:, 1:])


def test_release_checkpoint_layouts_load(tmp_path):
    src = create_vfm("dino_b8", "random", seed=7, model_kwargs=TINY_DINO)
    sd = src.vit.state_dict()  # DINO's release files use these key names
    torch.save(sd, tmp_path / "dino_vitbase8_pretrain.pth")
    # a full DINO training checkpoint: teacher weights under 'backbone.' plus a projection head
    full = {"teacher": {**{"backbone." + k: v for k, v in sd.items()}, "head.mlp.0.weight": torch.zeros(2, 2)},
            "epoch": 100}
    torch.save(full, tmp_path / "checkpoint.pth")
    for f in ("dino_vitbase8_pretrain.pth", "checkpoint.pth"):
        vfm = create_vfm("dino_b8", str(tmp_path / f), model_kwargs=TINY_DINO)
        for k, v in vfm.vit.state_dict().items():
            assert torch.equal(v, sd[k]), k
    with pytest.raises(ValueError, match="does not fit VFM 'dino_b8'"):
        create_vfm("dino_b8", str(tmp_path / "checkpoint.pth"))  # full-size arch, tiny weights
    with pytest.raises(FileNotFoundError, match="vfm_weights"):
        create_vfm("dino_b8", str(tmp_path / "missing.pth"))


def test_offline_error_names_file_and_option(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_home"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty_hf_home"), raising=False)
    with pytest.raises(WeightsUnavailableError) as e:
        create_vfm("dino_b8", None, model_kwargs=TINY_DINO)
    msg = str(e.value)
    assert "dino_vitbase8_pretrain.pth" in msg and "vfm_weights=PATH" in msg and "dl.fbaipublicfiles.com" in msg


def test_unknown_vfm_did_you_mean():
    assert "dino_b8" in list_vfms()
    with pytest.raises(ValueError, match="did you mean 'dino_b8'"):
        create_vfm("dino_b9", "random")
