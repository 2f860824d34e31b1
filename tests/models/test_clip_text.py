"""The truncated / shared-prefix text tower against open_clip's own ``encode_text`` (seeded random weights).

Tolerance. Both sides run in float32 (unit roundoff u = 2**-24) and differ only in the order of summation: matmuls
over a different number of rows are blocked differently, and attention sums over the prompt's own tokens instead of
77 positions with zeros for the masked ones. Re-ordering a length-K sum moves it by about sqrt(K)·u relative to its
size (random-sign rounding errors). Every layer has about 8 dependent reductions (two LayerNorms, q/k/v, q·k,
attention·v, out-projection, the two MLP layers); the residual stream carries each layer's error on, and the
LayerNorms keep magnitudes of order one. So a text embedding may differ by about
layers × 8 × sqrt(K_max) × u relative to its norm (ViT-B/16: 12 × 8 × sqrt(2048) × 2**-24 = 2.6e-4); measured
differences are ~1e-6. A real error (a wrong position, a leaked padding token, a missing mask) moves an embedding by
more than 1e-2 (checked below with a one-token change), far outside the bound.
"""
import math

import pytest
import torch

from ovseg.backbones import create_clip
from ovseg.backbones.clip_text import _build_trie, encode_text, text_forward_mode
from ovseg.errors import InvalidInputError
from ovseg.text import get_templates

from ..conftest import TINY_CLIP

U32 = 2.0 ** -24


def _bound(model) -> float:
    blocks = (model.text.transformer if hasattr(model, "text") else model.transformer).resblocks
    k_max = max(blocks[0].mlp.c_fc.out_features, blocks[0].mlp.c_fc.in_features)
    return len(blocks) * 8 * math.sqrt(k_max) * U32


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def _prompts():
    # the references' templates (several lengths), labels of 1-3 words; one label is a prefix of another, one prompt
    # is repeated
    templates = get_templates("openai_imagenet")[::10]
    labels = ["cat", "dog", "dog house", "traffic light"]
    return [t.replace("{}", q) for q in labels for t in templates] + ["a photo of a cat."] * 2


@pytest.fixture(scope="module")
def vit_b16():
    return create_clip("ViT-B-16", "random", seed=0)


@torch.inference_mode()
def test_full_vit_b16_text_tower_equals_open_clip(vit_b16):
    model = vit_b16.model
    tokens = vit_b16.tokenize(_prompts())
    ref = model.encode_text(tokens)  # open_clip: every prompt through all 77 positions
    bound = _bound(model)
    assert text_forward_mode(model) == "shared_prefix"
    for mode in ("shared_prefix", "truncate"):
        ours = encode_text(model, tokens, mode=mode)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        assert _rel(ours, ref) < bound, (mode, _rel(ours, ref), bound)
    assert torch.equal(encode_text(model, tokens, mode="full"), ref)
    assert torch.equal(vit_b16.encode_text(tokens), encode_text(model, tokens))  # the adapter uses it
    # the tolerance is meaningful: removing one token (the final period) moves the embedding far outside it
    other = model.encode_text(vit_b16.tokenize(["a photo of a cat"]))
    assert _rel(other, ref[-1:]) > 100 * bound
    # rows do not depend on the rest of the batch (a prompt alone = the same prompt among others)
    alone = encode_text(model, tokens[5:6])
    assert _rel(alone, ref[5:6]) < bound


def test_trie_of_a_hand_made_batch():
    # SOT=1, EOT=9 (the largest id: argmax pooling), pad=0
    tokens = torch.tensor([[1, 5, 6, 9, 0], [1, 5, 7, 9, 0], [1, 5, 6, 9, 0], [1, 9, 0, 0, 0]])
    trie = _build_trie(tokens, tokens.argmax(-1))
    # distinct prefixes: (1) (1,5) (1,9) (1,5,6) (1,5,7) (1,5,6,9) (1,5,7,9) -> 7 nodes, grouped by depth
    assert trie.start == [0, 1, 3, 5, 7]
    assert trie.token.tolist() == [1, 5, 9, 6, 7, 9, 9]
    assert trie.position.tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert [a.tolist() for a in trie.ancestors] == [[[0]], [[0, 1], [0, 2]], [[0, 1, 3], [0, 1, 4]],
                                                     [[0, 1, 3, 5], [0, 1, 4, 6]]]
    assert trie.leaf.tolist() == [5, 6, 5, 2]  # the repeated prompt shares its node; the short one ends at depth 1


def _tiny(text_cfg=None, custom_text=False):
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = dict(TINY_CLIP["text_cfg"], **(text_cfg or {}))
    torch.manual_seed(0)
    cls = CustomTextCLIP if custom_text else CLIP
    model = cls(TINY_CLIP["embed_dim"], TINY_CLIP["vision_cfg"], cfg).eval()
    return model, open_clip.get_tokenizer("ViT-B-16")


@pytest.mark.parametrize("text_cfg,custom_text,mode", [
    ({}, False, "shared_prefix"),
    ({}, True, "shared_prefix"),  # CustomTextCLIP with open_clip's TextTransformer
    ({"qk_norm": True}, False, "truncate"),  # custom blocks: open_clip's blocks on the sliced mask
    ({"pool_type": "eos", "eos_id": 49407}, False, "shared_prefix"),  # 'eos' pooling (the worldwide models)
    ({"pool_type": "eos", "eos_id": 49407}, True, "shared_prefix"),
    ({"no_causal_mask": True}, False, "full"),  # bidirectional: every position sees the padding
    ({"pool_type": "last"}, False, "full"),  # reads position 76
    ({"embed_cls": True}, True, "full"),  # CoCa-style appended class token
])
@torch.inference_mode()
def test_mode_per_architecture_and_equality(text_cfg, custom_text, mode):
    model, tok = _tiny(text_cfg, custom_text)
    tokens = tok(_prompts())
    assert text_forward_mode(model) == mode
    ref = model.encode_text(tokens)
    ours = encode_text(model, tokens)
    if mode == "full":
        assert torch.equal(ours, ref)
        with pytest.raises(InvalidInputError, match="not exact"):
            encode_text(model, tokens, mode="truncate")
    else:
        assert _rel(ours, ref) < _bound(model)
    if mode == "truncate":
        with pytest.raises(InvalidInputError, match="'shared_prefix' is not exact"):
            encode_text(model, tokens, mode="shared_prefix")


def test_bad_mode_and_tokens():
    model, tok = _tiny()
    with pytest.raises(InvalidInputError, match="'fast'"):
        encode_text(model, tok(["a"]), mode="fast")
    with pytest.raises(InvalidInputError, match="shape"):
        encode_text(model, torch.zeros(0, 77, dtype=torch.long))


def test_training_mode_runs_open_clip_unchanged():
    model, tok = _tiny()
    model.train()
    assert text_forward_mode(model) == "full"


def test_tiny_clip_adapter_default_path():
    clip = create_clip("ViT-B-16", "random", model_kwargs=TINY_CLIP)
    tokens = clip.tokenize(_prompts())
    with torch.inference_mode():
        assert _rel(clip.encode_text(tokens), clip.model.encode_text(tokens)) < _bound(clip.model)
