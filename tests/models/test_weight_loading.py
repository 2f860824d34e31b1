"""A local CLIP file always loads with the activation it was trained with (tiny configs of the real open_clip
ViT, seeded random weights); official weights load from a warm cache without network, and downloads fail fast
with the exact call that loads the file offline (the hub is simulated with monkeypatch)."""
import json
import os

import pytest
import torch

from ovseg.attention import get_attention
from ovseg.backbones import create_clip
from ovseg.backbones.clip_weights import find_checkpoint, resolve_file_activation
from ovseg.errors import InvalidInputError, OvsegError, WeightsUnavailableError

from ..conftest import TINY_CLIP

OPENAI_REPO = "models--timm--vit_base_patch16_clip_224.openai"
LAION_REPO = "models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K"
METACLIP_REPO = "models--timm--vit_base_patch16_clip_224.metaclip_2pt5b"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Seeded tiny weights of a QuickGELU CLIP, saved as the hub saves OpenAI's ViT-B/16: a plain state dict with
    OpenAI's key names and no input_resolution/context_length/vocab_size entries, as .bin and .safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = create_clip("ViT-B-16-quickgelu", "random", seed=3, model_kwargs=TINY_CLIP)
    sd = {k: v.clone().contiguous() for k, v in src.model.state_dict().items()}
    d = tmp_path_factory.mktemp("hub_files")
    torch.save(sd, d / "open_clip_pytorch_model.bin")
    save_file(sd, str(d / "open_clip_model.safetensors"))
    return dict(src=src, sd=sd, dir=d)


def _hf_cache(root, repo_folder, sd, name="open_clip_pytorch_model.bin"):
    """The Hugging Face cache layout: refs/main -> snapshots/<commit>/<file> -> symlink into blobs/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / repo_folder
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(repo / "blobs" / "a1b2c3"))
    else:
        torch.save(sd, repo / "blobs" / "a1b2c3")
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    os.symlink(os.path.join("..", "..", "blobs", "a1b2c3"), snap / name)
    return repo, snap / name


def _dense(clip, x):
    return clip.forward_dense(x, get_attention("vanilla"))


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
@torch.inference_mode()
def test_hub_file_with_clip_tag_openai_loads_as_quickgelu(weights, name):
    """clip_tag='openai' -> QuickGELU; dense features equal those of ViT-B-16-quickgelu with the same weights,
    and differ from the same file loaded as GELU (so the activation is really in play)."""
    path = str(weights["dir"] / name)
    clip = create_clip("ViT-B-16", path, tag="openai", model_kwargs=TINY_CLIP)
    assert clip.activation == "quick_gelu"
    assert clip.identity == dict(arch="ViT-B-16", source="file", tag="openai", path=path, activation="quick_gelu",
                                 seed=None, model_kwargs=TINY_CLIP)
    x = torch.randn(2, 3, 64, 96)
    ours, ref = _dense(clip, x), _dense(weights["src"], x)
    assert ours.shape == (2, 32, 4, 6)
    assert torch.equal(ours, ref)  # same weights, same modules, same code path
    as_gelu = create_clip("ViT-B-16", path, tag="laion2b_s34b_b88k", model_kwargs=TINY_CLIP)
    assert as_gelu.activation == "gelu"
    assert not torch.allclose(_dense(as_gelu, x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_unidentified_file_never_loads_silently_as_gelu(weights, name):
    """Without clip_tag the hub file cannot be identified and ViT-B-16's tags disagree: an error that names both
    choices and the exact Python call and CLI flags for each."""
    path = str(weights["dir"] / name)
    with pytest.raises(InvalidInputError) as e:
        create_clip("ViT-B-16", path, model_kwargs=TINY_CLIP)
    msg = str(e.value)
    for needle in (path, "QuickGELU", "GELU", f"clip_weights={json.dumps(path)}, clip_tag=\"openai\"",
                   'clip_tag="laion2b_s34b_b88k"', "--clip-tag openai", "--clip-tag laion2b_s34b_b88k",
                   "--clip ViT-B-16"):
        assert needle in msg, needle


def test_openai_torchscript_archive_is_recognised(weights, tmp_path):
    """A TorchScript archive (OpenAI's release format) of the same tensors -> QuickGELU without clip_tag."""
    from ovseg.weights import is_torchscript_archive

    root = torch.nn.Module()  # submodules/buffers named like the state dict: its TorchScript state_dict matches
    for k, v in weights["sd"].items():
        *parents, leaf = k.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        mod.register_buffer(leaf, v.clone())
    with pytest.warns(FutureWarning):  # torch marks torch.jit as deprecated; OpenAI's files are still TorchScript
        torch.jit.save(torch.jit.script(root), str(tmp_path / "ViT-B-16.pt"))
    assert is_torchscript_archive(tmp_path / "ViT-B-16.pt")
    assert not is_torchscript_archive(weights["dir"] / "open_clip_pytorch_model.bin")
    clip = create_clip("ViT-B-16", str(tmp_path / "ViT-B-16.pt"), model_kwargs=TINY_CLIP)
    assert clip.activation == "quick_gelu" and clip.identity["tag"] == "openai"
    for k, v in clip.model.state_dict().items():
        assert torch.equal(v, weights["sd"][k]), k
    with pytest.raises(InvalidInputError, match="contradicts"):  # a GELU tag for OpenAI's file
        create_clip("ViT-B-16", str(tmp_path / "ViT-B-16.pt"), tag="laion2b_s34b_b88k", model_kwargs=TINY_CLIP)


def test_openai_extra_keys_are_recognised(weights, tmp_path):
    sd = dict(weights["sd"], input_resolution=torch.tensor(224), context_length=torch.tensor(77),
              vocab_size=torch.tensor(49408))
    torch.save(sd, tmp_path / "clip.pt")
    clip = create_clip("ViT-B-16", str(tmp_path / "clip.pt"), model_kwargs=TINY_CLIP)
    assert clip.activation == "quick_gelu"
    qg, tag, reason = resolve_file_activation("ViT-B-16", tmp_path / "clip.pt", list(sd))
    assert (qg, tag) == (True, "openai") and "input_resolution" in reason


@torch.inference_mode()
def test_hugging_face_cache_paths_name_the_tag(weights, tmp_path):
    """A file in the hub cache of timm/vit_base_patch16_clip_224.openai is 'openai' (QuickGELU), one in LAION's
    repo is laion2b_s34b_b88k (GELU); the repo folder itself resolves to its refs/main snapshot."""
    repo, file = _hf_cache(tmp_path, OPENAI_REPO, weights["sd"])
    for given in (file, repo):
        clip = create_clip("ViT-B-16", str(given), model_kwargs=TINY_CLIP)
        assert clip.activation == "quick_gelu"
        assert clip.identity["source"] == "file" and clip.identity["tag"] == "openai"
        assert clip.identity["path"] == str(file)
    x = torch.randn(1, 3, 48, 48)
    assert torch.equal(_dense(clip, x), _dense(weights["src"], x))
    _, laion = _hf_cache(tmp_path, LAION_REPO, weights["sd"], name="open_clip_model.bin")
    assert resolve_file_activation("ViT-B-16", laion, [])[:2] == (False, "laion2b_s34b_b88k")
    with pytest.raises(InvalidInputError, match="contradicts"):
        resolve_file_activation("ViT-B-16", laion, [], tag="openai")
    with pytest.raises(InvalidInputError, match="forces QuickGELU"):
        resolve_file_activation("ViT-B-16-quickgelu", laion, [])
    _, meta = _hf_cache(tmp_path, METACLIP_REPO, weights["sd"])
    for arch in ("ViT-B-16", "ViT-B-16-quickgelu"):
        assert resolve_file_activation(arch, meta, [])[:2] == (True, "metaclip_fullcc")


def test_open_clip_config_folders(weights, tmp_path):
    """A downloaded hub folder: named like its repo -> that tag; an open_clip_config.json with quick_gelu decides;
    neither -> the ambiguity error."""
    def folder(name, model_cfg):
        d = tmp_path / name
        d.mkdir()
        (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
        torch.save(weights["sd"], d / "open_clip_pytorch_model.bin")
        return d

    named = folder("vit_base_patch16_clip_224.openai", {"embed_dim": 512})
    clip = create_clip("ViT-B-16", str(named), model_kwargs=TINY_CLIP)
    assert clip.activation == "quick_gelu" and clip.identity["tag"] == "openai"
    flagged = folder("my_clip", {"embed_dim": 512, "quick_gelu": True})
    assert resolve_file_activation("ViT-B-16", flagged / "open_clip_pytorch_model.bin", []) [:2] == (True, None)
    plain = folder("my_other_clip", {"embed_dim": 512})
    with pytest.raises(InvalidInputError, match="cannot tell"):
        create_clip("ViT-B-16", str(plain), model_kwargs=TINY_CLIP)
    clip = create_clip("ViT-B-16", str(plain), tag="openai", model_kwargs=TINY_CLIP)  # clip_tag with a folder
    assert clip.activation == "quick_gelu"


def test_architecture_rules_for_unidentified_files(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    assert resolve_file_activation("ViT-B-16-quickgelu", f, [])[0] is True  # the name fixes QuickGELU
    assert resolve_file_activation("ViT-L-14-336", f, [])[0] is True  # its only tag is openai (QuickGELU)
    assert resolve_file_activation("ViT-B-16-plus", f, [])[0] is False  # no tags: the config's GELU
    with pytest.raises(InvalidInputError, match="cannot tell"):
        resolve_file_activation("ViT-L-14", f, [])
    with pytest.raises(InvalidInputError, match="cannot tell"):
        resolve_file_activation("ViT-H-14", f, [])


def test_folders_without_one_checkpoint_are_refused(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="exactly one checkpoint"):
        find_checkpoint(tmp_path)
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    assert find_checkpoint(tmp_path).name == "open_clip_model.safetensors"  # open_clip's own name wins


def test_clip_tag_errors(weights):
    path = str(weights["dir"] / "open_clip_pytorch_model.bin")
    with pytest.raises(InvalidInputError, match="did you mean 'openai'"):
        create_clip("ViT-B-16", path, tag="opnai", model_kwargs=TINY_CLIP)
    with pytest.raises(TypeError, match="clip_tag"):
        create_clip("ViT-B-16", path, tag=1, model_kwargs=TINY_CLIP)
    with pytest.raises(InvalidInputError, match="random"):
        create_clip("ViT-B-16", "random", tag="openai", model_kwargs=TINY_CLIP)
    with pytest.raises(InvalidInputError, match="contradicts clip_weights 'openai'"):
        create_clip("ViT-B-16", "openai", tag="laion2b_s34b_b88k", model_kwargs=TINY_CLIP)
    with pytest.raises(InvalidInputError, match="model_kwargs quick_gelu=False contradicts"):
        create_clip("ViT-B-16", path, tag="openai", model_kwargs=dict(TINY_CLIP, quick_gelu=False))


@torch.inference_mode()
def test_pretrained_tag_loads_its_file_strictly_with_its_activation(weights, monkeypatch):
    """A tag's file goes through the same strict load; the tag's config decides the activation."""
    import ovseg.backbones.clip as clip_mod

    file = str(weights["dir"] / "open_clip_model.safetensors")
    monkeypatch.setattr(clip_mod, "fetch_tag_file", lambda arch, tag, cache_dir=None: file)
    clip = create_clip("ViT-B-16", "openai", model_kwargs=TINY_CLIP)
    assert clip.identity == dict(arch="ViT-B-16", source="tag", tag="openai", path=None, activation="quick_gelu",
                                 seed=None, model_kwargs=TINY_CLIP)
    json.dumps(clip.identity)
    x = torch.randn(1, 3, 48, 64)
    assert torch.equal(_dense(clip, x), _dense(weights["src"], x))
    with pytest.raises(InvalidInputError, match="does not fit architecture 'ViT-B-16'"):
        create_clip("ViT-B-16", "openai")  # the tiny file into the full-size architecture


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty Hugging Face cache, HF_HUB_OFFLINE unset, and every hub connection failing like a missing DNS."""
    import huggingface_hub
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty_cache"), raising=False)
    calls = []
    real_download = huggingface_hub.hf_hub_download

    def head(url, *a, **k):
        calls.append(url)
        raise ConnectionError("[Errno -2] Name or service not known (simulated)")

    def download(*a, **k):
        assert k.get("local_files_only"), "a download was attempted after the connection failed"
        return real_download(*a, **k)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", head)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


def test_no_network_fails_at_the_first_connection_with_one_clear_error(no_network):
    with pytest.raises(WeightsUnavailableError) as e:
        create_clip("ViT-B-16", "openai", model_kwargs=TINY_CLIP)
    msg = str(e.value)
    assert len(no_network) == 1  # one HEAD request, no retries, no second file name
    assert isinstance(e.value.__cause__, ConnectionError)
    for needle in ("HF_HUB_OFFLINE=1", "open_clip_model.safetensors", "timm/vit_base_patch16_clip_224.openai",
                   "ViT-B-16.pt", 'clip="ViT-B-16", clip_weights=PATH, clip_tag="openai"',
                   "--clip-weights PATH --clip-tag openai"):
        assert needle in msg, needle


def test_vfm_no_network_fails_fast_too(no_network):
    from ovseg.backbones import create_vfm

    from ..conftest import TINY_DINO

    with pytest.raises(WeightsUnavailableError) as e:
        create_vfm("dino_b8", None, model_kwargs=TINY_DINO)
    msg = str(e.value)
    assert len(no_network) == 1
    for needle in ("HF_HUB_OFFLINE=1", "dino_vitbase8_pretrain.pth", "dl.fbaipublicfiles.com",
                   'vfm="dino_b8", vfm_weights=PATH', "--vfm dino_b8 --vfm-weights PATH"):
        assert needle in msg, needle


@torch.inference_mode()
def test_official_weights_load_from_a_warm_cache_without_network(no_network, weights):
    """A cached tag (open_clip's hub file) and a cached timm VFM file load without any request: the CLIP one with
    its tag's QuickGELU, the VFM one through timm's own loader."""
    from pathlib import Path

    import huggingface_hub.constants as c

    from ovseg.backbones import create_vfm

    from ..conftest import TINY_DINO

    cache = Path(c.HF_HUB_CACHE)
    _hf_cache(cache, OPENAI_REPO, weights["sd"], name="open_clip_model.safetensors")
    clip = create_clip("ViT-B-16", "openai", model_kwargs=TINY_CLIP)
    assert clip.activation == "quick_gelu" and clip.identity["source"] == "tag"
    x = torch.randn(1, 3, 48, 64)
    assert torch.equal(_dense(clip, x), _dense(weights["src"], x))
    src = create_vfm("dino_b8", "random", seed=4, model_kwargs=TINY_DINO)
    _hf_cache(cache, "models--timm--vit_base_patch8_224.dino", src.vit.state_dict(), name="model.safetensors")
    vfm = create_vfm("dino_b8", None, model_kwargs=TINY_DINO)
    for k, v in src.vit.state_dict().items():
        assert torch.equal(vfm.vit.state_dict()[k], v), k
    assert no_network == []


def test_model_kwargs_typo_is_the_constructors_error_not_a_download_error(no_network):
    from ovseg.backbones import create_vfm

    bad = dict(TINY_CLIP, vision_cfg=dict(TINY_CLIP["vision_cfg"], layrs=3))
    with pytest.raises(TypeError, match="layrs") as e:
        create_clip("ViT-B-16", "openai", model_kwargs=bad)
    assert not isinstance(e.value, OvsegError)
    with pytest.raises(TypeError, match="dpth"):
        create_vfm("dino_b8", None, model_kwargs={"dpth": 2})
    assert no_network == []  # both stopped before any connection


def test_sd_model_kwargs_are_checked():
    pytest.importorskip("diffusers")
    from ovseg.backbones import create_vfm

    with pytest.raises(InvalidInputError, match="unett"):
        create_vfm("sd15", "random", model_kwargs={"unett": {}})
    with pytest.raises(InvalidInputError, match="only apply to vfm_weights='random'"):
        create_vfm("sd15", None, model_kwargs={"unet": {}})


def test_sd_no_network_fails_fast(no_network):
    pytest.importorskip("diffusers")
    from ovseg.backbones import create_vfm

    with pytest.raises(WeightsUnavailableError) as e:
        create_vfm("sd15")
    assert len(no_network) == 1
    assert "HF_HUB_OFFLINE=1" in str(e.value) and 'vfm="sd15", vfm_weights=PATH' in str(e.value)


def test_segmenter_repr_shows_the_activation(weights):
    from ..conftest import make_segmenter

    seg = make_segmenter("naclip", clip_weights=str(weights["dir"] / "open_clip_model.safetensors"),
                         clip_tag="openai")
    assert "clip_activation='quick_gelu'" in repr(seg)
    assert "clip_activation='gelu'" in repr(make_segmenter("naclip"))
