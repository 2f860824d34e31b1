"""CASS operations (ovseg.ops.cass) against hand-computed examples, independent re-derivations (PIL, full
eigen/SVD decompositions, torch.svd_lowrank) and numbers dumped from the official code on the same seeded inputs.

The official-code literals come from running the reference functions (``custom_attn``, ``hierarchical_clustering``,
``hierarchical_prompt``, the window-to-DINO conversion) on CPU in fp32 on the inputs built by the helpers below.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovseg.errors import InvalidInputError, InvalidTypeError
from ovseg.ops import cass as C

CLIP_PIXEL_MEAN = torch.tensor([122.771, 116.746, 104.094]).view(3, 1, 1)
CLIP_PIXEL_STD = torch.tensor([68.501, 66.632, 70.323]).view(3, 1, 1)


def randn(seed, *shape):
    """float64 normal draws from a seeded generator, cast to float32 (how the official-code inputs were made)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).float()


def clip_normalise(rgb: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(rgb).permute(2, 0, 1).float() - CLIP_PIXEL_MEAN) / CLIP_PIXEL_STD).unsqueeze(0)


def pil_dino_input(rgb: np.ndarray) -> torch.Tensor:
    """The reference's window -> DINO conversion re-derived with numpy and PIL (not the official code)."""
    x = clip_normalise(rgb)[0].numpy()
    # torchvision Normalize(mean=-m/s, std=1/s), the constants computed in double then stored as float32
    mean = np.array([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.255], np.float32)[:, None, None]
    std = np.array([1 / 0.229, 1 / 0.224, 1 / 0.255], np.float32)[:, None, None]
    u = (x - mean) / std
    img = Image.fromarray((u.transpose(1, 2, 0) * 255).astype(np.uint8))
    r = min(img.size)
    img = img.resize((r, r))
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    t = (t - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return t[:, : r // 8 * 8, : r // 8 * 8]


# ------------------------------------------------------------------------------------------- VFM input


def test_dino_input_square_window_hand_example():
    # a square window is not resized: per channel u8 = trunc(255·(x·s + m)), then ImageNet-normalised
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0, 128, 255
    out = C.dino_input(clip_normalise(rgb))
    x = clip_normalise(rgb)[0, :, 0, 0].double()
    u8 = torch.floor(255 * (x * torch.tensor([0.229, 0.224, 0.255], dtype=torch.float64)
                            + torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)))
    expected = (u8 / 255 - torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)) / \
        torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out[0, :, 3, 5].double(), expected, atol=1e-6, rtol=0)
    assert u8.tolist() == [19.0, 125.0, 243.0]  # blue: 243 with the 0.255 typo (226 with ImageNet's 0.225)


def test_dino_input_matches_official_literals():
    rgb = np.random.RandomState(3).randint(0, 256, (20, 27, 3)).astype(np.uint8)
    out = C.dino_input(clip_normalise(rgb))
    assert out.shape == (1, 3, 16, 16)  # squashed to 20x20, cropped to a multiple of 8
    expected = torch.tensor([[-0.04580877348780632, -0.9534206390380859, -0.0629335269331932],
                             [0.7829132676124573, -0.33753496408462524, 0.5728292465209961],
                             [2.082265853881836, 2.0299782752990723, 0.6007844805717468]])
    torch.testing.assert_close(out[0, :, 0, :3], expected, atol=1e-6, rtol=0)
    assert abs(out.double().sum().item() - 144.42443563323468) < 1e-3


@pytest.mark.parametrize("size", [(20, 27), (27, 20), (16, 16), (33, 50), (224, 200), (9, 300)])
def test_dino_input_equals_pil_pipeline(size):
    rgb = np.random.RandomState(sum(size)).randint(0, 256, size + (3,)).astype(np.uint8)
    assert torch.equal(C.dino_input(clip_normalise(rgb))[0], pil_dino_input(rgb))


@pytest.mark.parametrize("src,dst", [((20, 27), (20, 20)), ((50, 33), (33, 33)), ((7, 5), (20, 2)),
                                     ((40, 40), (61, 29)), ((336, 500), (336, 336))])
def test_pil_bicubic_is_exact(src, dst):
    arr = np.random.RandomState(src[0] * dst[1]).randint(0, 256, src + (3,)).astype(np.uint8)
    ref = np.asarray(Image.fromarray(arr).resize((dst[1], dst[0])))
    out = C._pil_bicubic(torch.from_numpy(arr).permute(2, 0, 1)[None], dst)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(out, ref)


def test_dino_input_options_and_batch():
    rs = np.random.RandomState(5)
    rgbs = [rs.randint(0, 256, (24, 37, 3)).astype(np.uint8) for _ in range(2)]
    crops = torch.cat([clip_normalise(r) for r in rgbs])
    both = C.dino_input(crops)
    for i in range(2):
        assert torch.equal(both[i], C.dino_input(crops[i:i + 1])[0])  # batch = one by one
    kept = C.dino_input(crops, square=False, denormalize="clip")
    assert kept.shape == (2, 3, 24, 32)
    pixels = kept * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
        1, 3, 1, 1)
    expected = torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2)[..., :32].float() / 255
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)  # 'clip' recovers the 8-bit pixels


def test_dino_input_errors():
    with pytest.raises(InvalidInputError, match="3 channels"):
        C.dino_input(torch.zeros(1, 4, 16, 16))
    with pytest.raises(InvalidInputError, match="denormalize"):
        C.dino_input(torch.zeros(1, 3, 16, 16), denormalize="imagenet")
    with pytest.raises(InvalidInputError, match="smaller than one 8x8 patch"):
        C.dino_input(torch.zeros(1, 3, 7, 30))
    with pytest.raises(InvalidTypeError):
        C.dino_input(np.zeros((1, 3, 16, 16)))


# ------------------------------------------------------------------------------------ keys and ranges


def test_resize_keys_layout_and_exact_pooling():
    # token t of a 4x4 grid carries value t in channel 0 and -t in channel 1; 4x4 -> 2x2 bilinear = 2x2 mean
    t = torch.arange(16.0)
    keys = torch.stack([t, -t], dim=-1).view(1, 1, 16, 2)
    out = C.resize_keys(keys, (4, 4), (2, 2))
    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]]).flatten()
    torch.testing.assert_close(out[0, 0, :, 0], expected)
    torch.testing.assert_close(out[0, 0, :, 1], -expected)
    same = C.resize_keys(keys, (2, 8), (2, 8))
    assert torch.equal(same, keys)  # row-major layout kept, no resampling on equal grids
    with pytest.raises(InvalidInputError, match="16 tokens"):
        C.resize_keys(keys, (3, 5), (2, 2))


def test_minmax_and_key_range():
    x = torch.tensor([[1.0, 3.0], [5.0, 9.0]])
    out = C.minmax_to(x, torch.tensor(-1.0), torch.tensor(1.0), dims=(0, 1))
    torch.testing.assert_close(out, torch.tensor([[-1.0, -0.5], [0.0, 1.0]]))
    const = C.minmax_to(torch.full((3,), 2.0), torch.tensor(4.0), torch.tensor(7.0), dims=(0,))
    assert torch.equal(const, torch.full((3,), 4.0))  # an empty range maps to lo (the reference gives NaN)
    assert C.minmax_to(x.double(), torch.tensor(0.0), torch.tensor(1.0), dims=(0, 1)).dtype == torch.float64
    vk, ck = randn(1, 2, 3, 5, 4), randn(2, 2, 2, 5, 6) * 3
    out = C.match_key_range(vk, ck)
    for b in range(2):
        assert out[b].min().item() == pytest.approx(ck[b].min().item(), abs=1e-6)
        assert out[b].max().item() == pytest.approx(ck[b].max().item(), abs=1e-6)
        torch.testing.assert_close(out[b:b + 1], C.match_key_range(vk[b:b + 1], ck[b:b + 1]))


# ------------------------------------------------------------------------------ spectra and matching


@pytest.mark.parametrize("method", ["graph", "gram"])
@pytest.mark.parametrize("n,hd,num", [(30, 24, 20), (12, 24, 20), (30, 6, 10)])
def test_key_spectra_equal_eigenvalues_of_the_token_graph(n, hd, num, method):
    keys = randn(3, 2, 3, n, hd).double()
    s = 0.125
    ref = torch.linalg.eigvalsh(keys @ keys.transpose(-2, -1) * s).flip(-1)[..., :min(num, n)]
    out = C.key_spectra(keys, scale=s, num_eigs=num, method=method)
    assert out.shape == (2, 3, min(num, n)) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref.clamp_min(0) if hd < num else ref, atol=1e-9, rtol=1e-9)


def test_key_spectra_graph_method_is_the_reference_computation():
    keys = randn(4, 1, 3, 40, 16)  # float32 keys: the graph is built in float32, then decomposed in float64
    a = (keys @ keys.transpose(-2, -1)) * 0.125
    ref = torch.stack([torch.linalg.eigvalsh(a[0, h].double()).sort(descending=True).values[:20] for h in range(3)])
    assert torch.equal(C.key_spectra(keys, scale=0.125)[0], ref)
    with pytest.raises(InvalidInputError, match="method"):
        C.key_spectra(keys, scale=0.125, method="svd")


def test_spectral_distances_hand_example():
    v = torch.tensor([[[3.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    c = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]], dtype=torch.float64)
    # p = [.75, .25], [.5, .5]; c = [.5, .5], [1, 0]; sorted element-wise |differences|
    expected = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(C.spectral_distances(v, c), expected)


def test_match_heads_maximises_distance_and_the_index_swap():
    w = torch.tensor([[[0.1, 0.9, 0.2], [0.3, 0.2, 0.8], [0.7, 0.1, 0.3]]], dtype=torch.float64)
    m = C.match_heads(w)  # the maximum-distance assignment is the 3-cycle 0->1, 1->2, 2->0
    assert m.assignment.tolist() == [[1, 2, 0]]
    assert m.vfm_head.tolist() == [[1, 2, 0]]  # reference: CLIP head h gets VFM head σ(h) ...
    torch.testing.assert_close(m.weight, torch.tensor([[0.9, 0.8, 0.7]]), atol=1e-7, rtol=0)  # ... weight W[h, σ(h)]
    fixed = C.match_heads(w, swap_quirk=False)
    assert fixed.vfm_head.tolist() == [[2, 0, 1]]  # CLIP head σ(i) gets VFM head i
    torch.testing.assert_close(fixed.weight, torch.tensor([[0.7, 0.9, 0.8]]), atol=1e-7, rtol=0)
    ties = C.match_heads(torch.full((2, 4, 4), 0.5, dtype=torch.float64))
    assert ties.assignment.tolist() == [[0, 1, 2, 3]] * 2  # a constant cost: scipy returns the identity
    # the cost is float32(1 - W), as in the reference: a float64 preference below float32 resolution is a tie
    anti = torch.full((1, 3, 3), 0.5, dtype=torch.float64) + 1e-12 * torch.eye(3, dtype=torch.float64).flip(-1)
    assert C.match_heads(anti).assignment.tolist() == [[0, 1, 2]]
    assert C.match_heads(anti + 1e-6 * torch.eye(3, dtype=torch.float64).flip(-1)).assignment.tolist() == [[2, 1, 0]]
    # separable distances W[i, j] = a_i + b_j: every assignment has the same exact total; the float32 rounding
    # of the cost and scipy's order decide, so ovseg must hand scipy the very same float32 matrix
    from scipy.optimize import linear_sum_assignment

    sep = (torch.tensor([0.1, 0.3, 0.2])[:, None] + torch.tensor([0.05, 0.0, 0.1])[None, :]).double()[None]
    assert C.match_heads(sep).assignment[0].tolist() == linear_sum_assignment((1 - sep[0]).float().numpy())[1].tolist()
    batch = torch.cat([w, w.flip(-1)])
    mb = C.match_heads(batch)
    assert mb.assignment[1].tolist() == C.match_heads(w.flip(-1)).assignment[0].tolist()
    with pytest.raises(InvalidInputError, match="as many VFM heads"):
        C.match_heads(torch.zeros(1, 3, 4, dtype=torch.float64))


# ---------------------------------------------------------------------------------- low-rank graphs


def test_eigenscale_hand_example():
    s = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    out = C.eigenscale(s)  # [min, max] = [1, 3] -> [0.5, 4.5]; a constant vector -> s/2
    torch.testing.assert_close(out, torch.tensor([[0.5, 2.5, 4.5], [1.0, 1.0, 1.0]], dtype=torch.float64))


def _truncated_svd(a, r, scaling):
    u, s, vh = torch.linalg.svd(a)
    s = s[..., :r]
    s = C.eigenscale(s) if scaling else s
    return (u[..., :r] * s.unsqueeze(-2)) @ vh[..., :r, :]


@pytest.mark.parametrize("scaling", [False, True])
def test_lowrank_graph_exact_is_the_truncated_svd(scaling):
    keys = randn(4, 2, 3, 40, 16).double() * torch.linspace(2, 0.1, 16, dtype=torch.float64)
    a = keys @ keys.transpose(-2, -1) * 0.25
    out = C.lowrank_graph(keys, scale=0.25, rank=10, eigenscaling=scaling)
    torch.testing.assert_close(out, _truncated_svd(a, 10, scaling), atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(out, out.transpose(-2, -1), atol=1e-12, rtol=0)
    # a rank above rank(A) = 16 reproduces A itself without eigenscaling
    torch.testing.assert_close(C.lowrank_graph(keys, scale=0.25, rank=20, eigenscaling=False), a, atol=1e-10,
                               rtol=1e-10)
    # fewer tokens than the rank: all of them (the reference fails there)
    small = keys[:, :, :6]
    torch.testing.assert_close(C.lowrank_graph(small, scale=0.25, rank=10, eigenscaling=False),
                               small @ small.transpose(-2, -1) * 0.25, atol=1e-10, rtol=1e-10)


def test_lowrank_graph_exact_rank_above_head_dim_keeps_the_zero_singular_values():
    keys = randn(5, 1, 1, 30, 6).double()
    a = keys @ keys.transpose(-2, -1) * 0.5
    out = C.lowrank_graph(keys, scale=0.5, rank=10, eigenscaling=True)  # singular values 7..10 are 0
    torch.testing.assert_close(out, _truncated_svd(a, 10, True), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("scaling", [False, True])
def test_lowrank_graph_randomized_reproduces_torch_svd_lowrank(scaling):
    keys = randn(6, 1, 2, 50, 24)
    a = ((keys @ keys.transpose(-2, -1)) * 0.2).double()
    sketches = C.draw_sketches(1, 2, 50, 10, generator=torch.Generator().manual_seed(11))
    out = C.lowrank_graph(keys, scale=0.2, rank=10, eigenscaling=scaling, svd="randomized", sketches=sketches)
    torch.manual_seed(11)  # torch.svd_lowrank draws one randn(L, q) per call from the global generator
    for h in range(2):
        u, s, v = torch.svd_lowrank(a[0, h], q=10, niter=2)
        s = C.eigenscale(s) if scaling else s
        torch.testing.assert_close(out[0, h], u @ torch.diag(s) @ v.T, atol=1e-10, rtol=1e-10)
    exact = C.lowrank_graph(keys, scale=0.2, rank=10, eigenscaling=scaling)
    assert not torch.allclose(out, exact, atol=1e-6)  # randomised != best rank-10 approximation
    with pytest.raises(InvalidInputError, match="sketches"):
        C.lowrank_graph(keys, scale=0.2, svd="randomized")
    with pytest.raises(InvalidInputError, match="svd must be"):
        C.lowrank_graph(keys, scale=0.2, svd="lanczos")


# ------------------------------------------------------------------- distilled attention vs official


NH, HD, GRID, VGRID = 4, 24, (5, 5), (7, 7)


def _official_attention_inputs():
    """The inputs of the official ``custom_attn`` dump: ln_1 output, in/out projections, DINO qkv."""
    d = NH * HD
    w_in, b_in = randn(1, 3 * d, d) * d ** -0.5, randn(2, 3 * d) * 0.1
    w_out, b_out = randn(3, d, d) * d ** -0.5, randn(4, d) * 0.1
    x = randn(5, 1 + GRID[0] * GRID[1], 1, d)
    qkv = randn(6, 3, 1, NH, 1 + VGRID[0] * VGRID[1], HD) * 1.7 + 0.3
    g = torch.Generator().manual_seed(102)
    ck = torch.rand(NH, generator=g, dtype=torch.float64).float() * 3
    dk = torch.rand(NH, generator=g, dtype=torch.float64).float() * 3
    ramp = torch.arange(HD).float() / HD
    w_in[d:2 * d] *= torch.exp(-ck[:, None] * ramp[None] * 3).reshape(-1)[:, None]
    qkv[1] = qkv[1] * torch.exp(-dk[:, None] * ramp[None] * 3)[None, :, None, :]
    q, k, v = F.linear(x, w_in, b_in).chunk(3, dim=-1)  # (1+L, 1, D)
    heads = lambda t: t.reshape(t.shape[0], NH, HD).permute(1, 0, 2).unsqueeze(0)  # (1, nh, 1+L, hd)
    return heads(q), heads(k), heads(v), qkv[1][:, :, 1:], (w_out, b_out)


# (dataset gating eigenscaling, svd) -> (combined[1, 3, :6], out[0, 0, :6], out.abs().sum()) from the official code
OFFICIAL = {
    (True, "exact"): ([0.2563289403915405, 0.5299934148788452, 0.24614953994750977, 0.18448060750961304,
                       0.3439277112483978, 0.29484790563583374],
                      [-0.2146836221218109, -0.7469568252563477, -0.22368237376213074, 0.010181277990341187,
                       -0.4327647089958191, -0.01546768844127655], 476.4624024780933),
    (True, "randomized"): ([0.2510209083557129, 0.5289919972419739, 0.244306743144989, 0.1810380518436432,
                            0.33647391200065613, 0.2880440950393677],
                           [-0.21446889638900757, -0.7472373247146606, -0.22286906838417053, 0.00988568365573883,
                            -0.430530309677124, -0.01567324995994568], 476.2751768694725),
    (False, "exact"): ([0.3145034611225128, 0.5334141850471497, 0.16611997783184052, 0.1626003086566925,
                        0.3651675581932068, 0.25336265563964844],
                       [-0.23693329095840454, -0.7557181119918823, -0.21078826487064362, 0.0017426908016204834,
                        -0.4061373472213745, -0.0386272668838501], 483.47795823356137),
    (False, "randomized"): ([0.2952444553375244, 0.5313615798950195, 0.16244544088840485, 0.15284273028373718,
                             0.34261026978492737, 0.23707357048988342],
                            [-0.23648855090141296, -0.7567839622497559, -0.20874780416488647, 0.0014491826295852661,
                             -0.40022948384284973, -0.03949376940727234], 482.77004315378144),
}


@pytest.mark.parametrize("scaling,svd", list(OFFICIAL))
def test_cass_attention_matches_official_custom_attn(scaling, svd):
    q, k, v, vk, (w_out, b_out) = _official_attention_inputs()
    combined_ref, out_ref, abs_ref = OFFICIAL[(scaling, svd)]
    kw = dict(grid=GRID, vfm_grid=VGRID, eigenscaling=scaling, svd=svd)
    logits, match = C.distilled_logits(k, vk, generator=torch.Generator().manual_seed(7), **kw)
    assert match.assignment.tolist() == [[3, 0, 1, 2]]  # the official Hungarian solution (a 4-cycle)
    torch.testing.assert_close(match.weight[0, 0], 1 - torch.tensor(0.5633389353752136), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits[0, 1, 3, :6], torch.tensor(combined_ref), atol=2e-5, rtol=1e-5)
    out = C.cass_attention(q, k, v, vfm_keys=vk, generator=torch.Generator().manual_seed(7), **kw)
    assert out.shape == (1, NH, 25, HD)
    proj = F.linear(out[0].permute(1, 0, 2).reshape(25, NH * HD), w_out, b_out)  # merge heads, out_proj
    torch.testing.assert_close(proj[0, :6], torch.tensor(out_ref), atol=2e-5, rtol=1e-5)
    assert proj.abs().sum().item() == pytest.approx(abs_ref, rel=1e-5)


def test_cass_attention_weights_are_softmax_of_logits_plus_gaussian():
    q, k, v, vk, _ = _official_attention_inputs()
    out, weights = C.cass_attention(q, k, v, vfm_keys=vk, grid=GRID, vfm_grid=VGRID, return_weights=True)
    logits, _ = C.distilled_logits(k, vk, grid=GRID, vfm_grid=VGRID)
    ii, jj = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
    pos = torch.stack([ii.flatten(), jj.flatten()], 1)
    omega = torch.exp(-torch.cdist(pos, pos) ** 2 / 50)  # NACLIP's Gaussian, σ = 5, no CLS
    torch.testing.assert_close(weights, torch.softmax(logits + omega, dim=-1))
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, NH, 25))
    torch.testing.assert_close(out, weights @ v[:, :, 1:])


def test_swap_quirk_changes_the_pairing_and_the_corrected_one_follows_the_assignment():
    q, k, v, vk, _ = _official_attention_inputs()
    _, quirk = C.distilled_logits(k, vk, grid=GRID, vfm_grid=VGRID)
    fixed_logits, fixed = C.distilled_logits(k, vk, grid=GRID, vfm_grid=VGRID, swap_quirk=False)
    sigma = quirk.assignment[0]
    assert fixed.vfm_head[0, sigma].tolist() == [0, 1, 2, 3]  # CLIP head σ(i) is fed by VFM head i
    assert quirk.vfm_head[0].tolist() == sigma.tolist()
    quirk_logits, _ = C.distilled_logits(k, vk, grid=GRID, vfm_grid=VGRID)
    assert not torch.allclose(quirk_logits, fixed_logits, atol=1e-3)


def test_sequential_matching_is_the_plain_average():
    q, k, v, vk, _ = _official_attention_inputs()
    logits, match = C.distilled_logits(k, vk, grid=GRID, vfm_grid=VGRID, matching="sequential")
    assert match.vfm_head.tolist() == [[0, 1, 2, 3]]
    kc = k[:, :, 1:]
    kd = C.match_key_range(C.resize_keys(vk, VGRID, GRID), kc)
    s = HD ** -0.5
    ac = (kc @ kc.transpose(-2, -1)) * s
    d = C.lowrank_graph(kd, scale=s, rank=10, eigenscaling=False)
    d.diagonal(dim1=-2, dim2=-1).zero_()
    d = C.minmax_to(d, ac.amin((-2, -1), keepdim=True), ac.amax((-2, -1), keepdim=True), dims=(-2, -1))
    torch.testing.assert_close(logits, ((d + ac.double()) / 2).float(), atol=1e-6, rtol=1e-6)


def test_cass_attention_batch_equals_one_by_one_and_is_deterministic():
    q, k, v, vk, _ = _official_attention_inputs()
    k2, v2, vk2 = k.flip(2), v * 0.5 + 0.1, vk.roll(3, dims=2)
    kb, vb, vkb = torch.cat([k, k2]), torch.cat([v, v2]), torch.cat([vk, vk2])
    kw = dict(grid=GRID, vfm_grid=VGRID)
    both = C.cass_attention(None, kb, vb, vfm_keys=vkb, **kw)
    torch.testing.assert_close(both[0:1], C.cass_attention(None, k, v, vfm_keys=vk, **kw), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both[1:2], C.cass_attention(None, k2, v2, vfm_keys=vk2, **kw), atol=1e-6, rtol=1e-6)
    assert torch.equal(both, C.cass_attention(None, kb, vb, vfm_keys=vkb, **kw))  # exact mode: deterministic
    # randomised mode draws window by window, head by head: one generator over the batch = the same generator
    # carried across single-window calls
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    rb = C.cass_attention(None, kb, vb, vfm_keys=vkb, svd="randomized", generator=g1, **kw)
    r0 = C.cass_attention(None, k, v, vfm_keys=vk, svd="randomized", generator=g2, **kw)
    r1 = C.cass_attention(None, k2, v2, vfm_keys=vk2, svd="randomized", generator=g2, **kw)
    torch.testing.assert_close(rb, torch.cat([r0, r1]), atol=1e-6, rtol=1e-6)


def test_cass_attention_errors():
    q, k, v, vk, _ = _official_attention_inputs()
    with pytest.raises(InvalidInputError, match="1 \\+ 4x5"):
        C.cass_attention(q, k, v, vfm_keys=vk, grid=(4, 5), vfm_grid=VGRID)
    with pytest.raises(InvalidInputError, match="one to one"):
        C.cass_attention(q, k, v, vfm_keys=vk[:, :3], grid=GRID, vfm_grid=VGRID)
    with pytest.raises(InvalidInputError, match="49 tokens"):
        C.cass_attention(q, k, v, vfm_keys=vk, grid=GRID, vfm_grid=(6, 6))
    with pytest.raises(InvalidInputError, match="matching"):
        C.cass_attention(q, k, v, vfm_keys=vk, grid=GRID, vfm_grid=VGRID, matching="greedy")
    with pytest.raises(InvalidInputError, match="batch mismatch"):
        C.cass_attention(q, k, v, vfm_keys=torch.cat([vk, vk]), grid=GRID, vfm_grid=VGRID)


# --------------------------------------------------------------------------------- object-presence prior


def _prior_inputs():
    base, noise = randn(20, 3, 16), randn(21, 7, 16)
    t = torch.stack([base[0], base[0], base[1], base[1], base[1], base[2], base[0]]) + 0.35 * noise
    t = t / t.norm(dim=-1, keepdim=True)
    feats = randn(22, 1, 12, 16)
    return t, feats / feats.norm(dim=-1, keepdim=True), randn(23, 1, 7) * 0.2


def _same_partition(a, b):
    a, b = list(a), list(b)
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


@pytest.mark.parametrize("threshold,official", [(0.0, [5, 3, 2, 0, 1, 6, 4]), (0.3, [1, 1, 0, 0, 0, 2, 1]),
                                                (0.6, [1, 1, 0, 0, 0, 2, 1]), (2.0, [0] * 7)])
def test_cluster_texts_matches_official(threshold, official):
    t, _, _ = _prior_inputs()
    out = C.cluster_texts(t, threshold)
    assert _same_partition(out.tolist(), official)
    assert out.tolist()[0] == 0 and max(out.tolist()) == len(set(official)) - 1  # numbered by first query


def test_cluster_texts_edge_cases():
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert C.cluster_texts(t, 0.0).tolist() == [0, 0, 1]  # identical embeddings join even at threshold 0
    assert C.cluster_texts(t[:1], 0.1).tolist() == [0]
    with pytest.raises(InvalidInputError, match="threshold"):
        C.cluster_texts(t, -0.1)


def test_presence_prior_hand_example():
    cls = torch.tensor([[3.0, 4.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    torch.testing.assert_close(C.presence_prior(cls, text), torch.tensor([[0.6, 0.8, 1.0]]))


def test_adjust_text_matches_official():
    t, feats, prior = _prior_inputs()
    out = C.adjust_text(feats, t, prior, C.cluster_texts(t, 0.6), alpha=0.3)
    official = torch.tensor([
        [-0.12016351521015167, 0.2777808904647827, -0.21879617869853973, -0.17439183592796326],
        [-0.13260769844055176, 0.28158530592918396, -0.12583836913108826, -0.1011124700307846],
        [-0.5654186606407166, -0.2726655602455139, 0.17102684080600739, -0.15397480130195618],
        [-0.643698513507843, -0.20942994952201843, 0.1862138956785202, -0.07225237041711807],
        [-0.6250036358833313, -0.26376092433929443, -0.011255710385739803, -0.200317844748497],
        [-0.12141850590705872, -0.08627340942621231, -0.5966314673423767, -0.022058557718992233],
        [-0.23763491213321686, 0.3588222861289978, -0.09134156256914139, -0.007876269519329071]])
    torch.testing.assert_close(out[0, :, :4], official, atol=1e-6, rtol=0)
    changed = (out[0] - t).abs().amax(-1) > 1e-6
    assert changed.sum().item() == 3  # one query per cluster (3 clusters), the rest untouched


def test_adjust_text_hand_example_and_ties():
    # two queries in one cluster with tied prior -> the first is adjusted; its top-2 patches, ties to low index
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    feats = torch.tensor([[[0.0, 0.0, 1.0], [0.6, 0.8, 0.0], [0.6, -0.8, 0.0], [0.6, 0.0, 0.8]]])
    prior = torch.tensor([[0.5, 0.5]])
    out = C.adjust_text(feats, text, prior, torch.tensor([0, 0]), alpha=0.5)
    # cosines with text[0]: 0, .6, .6, .6 -> patches 1 and 2 (ties to the lowest index); mean (0.6, 0, 0)
    torch.testing.assert_close(out[0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out[0, 1], text[1])
    out = C.adjust_text(feats, text, torch.tensor([[0.1, 0.5]]), torch.tensor([0, 0]), alpha=0.5)
    m = F.normalize((feats[0, 1] + feats[0, 0]) / 2, dim=0)  # cos with text[1]: 0, .8, -.8, 0 -> patches 1, 0
    torch.testing.assert_close(out[0, 1], F.normalize(0.5 * text[1] + 0.5 * m, dim=0))
    single = C.adjust_text(feats, text, prior, torch.tensor([0, 1]), alpha=0.0)
    torch.testing.assert_close(single[0], text)  # alpha 0: nothing moves


def test_presence_logits_formula_and_batch():
    t, feats, prior = _prior_inputs()
    feats2 = torch.cat([feats, feats.flip(1)])
    prior2 = torch.cat([prior, prior.flip(-1)])
    cl = C.cluster_texts(t, 0.3)
    out = C.presence_logits(feats2, t, prior2, cl, alpha=0.04, beta=0.25)
    adj = C.adjust_text(feats2, t, prior2, cl, alpha=0.04)
    expected = 0.75 * (feats2 @ adj.transpose(-2, -1)) + 0.25 * prior2[:, None, :]
    torch.testing.assert_close(out, expected)
    for b in range(2):
        torch.testing.assert_close(out[b:b + 1], C.presence_logits(feats2[b:b + 1], t, prior2[b:b + 1], cl,
                                                                   alpha=0.04, beta=0.25))
    only_prior = C.presence_logits(feats, t, prior, cl, alpha=0.04, beta=1.0)
    torch.testing.assert_close(only_prior, prior[:, None, :].expand(1, 12, 7))
    with pytest.raises(InvalidInputError, match="beta"):
        C.presence_logits(feats, t, prior, cl, alpha=0.04, beta=1.5)
    with pytest.raises(InvalidInputError, match="alpha"):
        C.adjust_text(feats, t, prior, cl, alpha=-0.1)
    with pytest.raises(InvalidInputError, match="shapes disagree"):
        C.adjust_text(feats, t[:5], prior, cl, alpha=0.1)
