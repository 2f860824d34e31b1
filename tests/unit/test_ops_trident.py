"""Equation-level tests of ovseg.ops.trident (Trident, ICCV 2025).

Numbers named in UPPER CASE were produced by running the official Trident code (its own functions, CPU, fp32)
on the seeded inputs that ``u`` builds here (the generator is duplicated verbatim on both sides); only small
slices are pinned. Everything else is a hand-computed example, an invariance or batch = one-by-one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ovseg.errors import InvalidInputError
from ovseg.ops import trident as T


def u(seed, *shape, lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64).float() * (hi - lo) + lo


def softmax_rows(seed, *shape):
    return torch.softmax(3 * u(seed, *shape), dim=-1)


def mha(seed, d, nh):
    m = nn.MultiheadAttention(d, nh)
    with torch.no_grad():
        m.in_proj_weight.copy_(u(seed, 3 * d, d))
        m.in_proj_bias.copy_(u(seed + 1, 3 * d, lo=-0.1, hi=0.1))
        m.out_proj.weight.copy_(u(seed + 2, d, d))
        m.out_proj.bias.copy_(u(seed + 3, d, lo=-0.1, hi=0.1))
    return m


# fp32 reference numbers rounded to 6 decimals; the re-implementation differs only in summation order
ATOL = 2e-5


def close(a, b, atol=ATOL):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------- official slices
INPUT_SIZES = [
    ((448, 597, 16, 336), (464, 608)),
    ((336, 448, 16, 336), (336, 448)),
    ((448, 597, 14, 336), (462, 602)),
    ((200, 300, 16, 336), (336, 336)),
    ((100, 700, 14, 336), (336, 700)),
    ((336, 437, 16, 336), (352, 448)),
    ((240, 320, 16, 336), (240, 320)),
    ((688, 1376, 16, 336), (688, 1376)),
]
WINDOW_BOXES = [
    (
        (464, 608, 16, 336, 224),
        [[0, 0, 21, 21], [0, 14, 21, 35], [0, 17, 21, 38], [8, 0, 29, 21], [8, 14, 29, 35], [8, 17, 29, 38]],
    ),
    (
        (352, 512, 16, 336, 112),
        [[0, 0, 21, 21], [0, 7, 21, 28], [0, 11, 21, 32], [1, 0, 22, 21], [1, 7, 22, 28], [1, 11, 22, 32]],
    ),
    (
        (476, 644, 14, 336, 224),
        [[0, 0, 24, 24], [0, 16, 24, 40], [0, 22, 24, 46], [10, 0, 34, 24], [10, 16, 34, 40], [10, 22, 34, 46]],
    ),
]
CUSTOM_ATTN_G3_I3 = [
    [[-1.290244, 0.242182, -0.411463], [-0.604204, -0.449948, -0.396555], [1.886985, -0.387806, -0.615837]],
    [[-0.214795, -0.948093, -1.164541], [-1.185048, 3.307485, 0.187972], [1.210439, -1.519669, 1.586792]],
    [[-0.129042, -0.410358, -1.326384], [0.399896, -1.629534, 0.111538], [0.704694, 1.202849, -0.002172]],
    [[-1.552187, -0.760429, -2.169995], [-0.229385, -0.680819, -0.852778], [1.015895, 1.180328, -0.112963]],
]
CUSTOM_ATTN_G4_I3 = [
    [[-0.859527, 0.146998, -0.710785], [-0.674859, 0.4676, -0.433243], [1.782921, -0.554796, -0.157456]],
    [[-0.693658, -0.678058, -1.756643], [0.000933, 0.276933, 0.467294], [0.772424, 0.098456, 0.412459]],
    [[-0.948097, -0.726848, -2.073071], [-0.547818, 0.264653, -1.167511], [0.634623, 0.319498, -0.252642]],
    [[0.261773, -0.626366, -0.5306], [-0.696525, 0.167803, -0.988014], [0.365317, 0.067166, -0.016059]],
]
SAM_SIM_12_1 = [
    [0.250672, 0.238064, 0.0, 0.0, 0.110379, 0.028911, 0.19973, 0.073109, 0.0, 0.078842, 0.020293, 0.0],
    [0.002039, 0.067692, 0.092087, 0.0, 0.252581, 0.0, 0.287193, 0.0, 0.246577, 0.041918, 0.0, 0.009912],
    [0.28935, 0.011693, 0.008309, 0.593645, 0.011924, 0.006059, 0.0, 0.0, 0.041853, 0.002715, 0.034452, 0.0],
    [0.0, 0.005162, 0.002471, 0.004251, 0.046767, 0.0, 0.0, 0.175855, 0.005837, 0.0, 0.178489, 0.581166],
]
SAM_SIM_0_1 = [
    [0.250672, 0.238064, 0.0, 0.0, 0.110379, 0.028911, 0.19973, 0.073109, 0.0, 0.078842, 0.020293, 0.0],
    [0.001774, 0.058904, 0.200978, 0.0, 0.219791, 0.002151, 0.24991, 0.0, 0.214567, 0.036476, 0.006823, 0.008625],
    [0.28935, 0.011693, 0.008309, 0.593645, 0.011924, 0.006059, 0.0, 0.0, 0.041853, 0.002715, 0.034452, 0.0],
    [0.0, 0.005162, 0.002471, 0.004251, 0.046767, 0.0, 0.0, 0.175855, 0.005837, 0.0, 0.178489, 0.581166],
]
SAM_SIM_30_0 = [
    [0.315846, 0.29996, 0.0, 0.0, 0.139078, 0.0, 0.033638, 0.092117, 0.0, 0.099341, 0.020022, 0.0],
    [0.00348, 0.115531, 0.0, 0.0, 0.431087, 0.0, 0.010096, 0.0, 0.42084, 0.002048, 0.0, 0.016918],
    [0.0, 0.0, 0.002479, 0.914642, 0.009059, 0.009336, 0.0, 0.0, 0.064485, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.007261, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.992739],
]
SAM_SIM_NEG_1 = [
    [0.247641, 0.281024, 0.408783, 0.036179, 0.0, 0.0, 0.026374, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.013957, 0.096543, 0.329398, 0.158943, 0.0, 0.0, 0.40116, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.533605, 0.018817, 0.031008, 0.41657, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.018147, 0.020185, 0.095401, 0.567174, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.299094],
]
SAM_SIM_NEG_0 = [
    [0.353843, 0.065497, 0.571239, 0.009421, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.018583, 0.162371, 0.553999, 0.265048, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.025934, 0.042851, 0.070611, 0.860605, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.020901, 0.009806, 0.067145, 0.902148, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
]
GUIDANCE_G3_I3 = [
    [-0.009775, 0.109494, 0.028625, -0.057198],
    [0.016875, 0.219396, 0.258331, 0.176454],
    [0.181094, -0.0226, -0.098387, -0.242661],
    [0.178917, 0.05333, 0.098668, -0.077964],
    [-0.099532, 0.384812, 0.219004, 0.011186],
    [0.223423, -0.175876, 0.045667, 0.038357],
    [0.292523, 0.002768, 0.262752, 0.047497],
    [0.166721, 0.105536, 0.17798, -0.036615],
    [0.127166, -0.019299, -0.068105, -0.226994],
    [-0.037806, -0.123521, 0.169662, 0.215037],
    [0.515869, -0.12367, 0.025244, -0.238096],
    [-0.219138, 0.180834, 0.286071, 0.353649],
]
GUIDANCE_G4_I3 = [
    [-0.01226, 0.141516, 0.035172, -0.051373],
    [0.094526, 0.208981, 0.21951, 0.119917],
    [0.161743, -0.036132, -0.116747, -0.15776],
    [0.203554, 0.033176, 0.053223, -0.055811],
    [-0.049018, 0.321689, 0.156709, -0.00527],
    [0.271865, -0.203004, 0.005298, 0.061042],
    [0.32163, 0.036676, 0.307241, 0.011743],
    [0.217184, 0.115672, 0.15036, -0.059468],
    [0.103824, -0.012662, -0.060265, -0.167402],
    [-0.027227, -0.09194, 0.105309, 0.175368],
    [0.520344, -0.141984, 0.032941, -0.166498],
    [-0.10991, 0.153688, 0.230951, 0.255784],
]
GUIDANCE_HALVES = [
    [-0.711443, 0.316984, -0.32317, 0.584353],
    [-0.721088, 0.256515, -0.175626, 0.576989],
    [0.133721, 0.613806, -0.277962, -0.337491],
    [0.027057, 0.069587, 0.041983, 0.031887],
    [0.02215, -0.118569, -0.428035, -0.155683],
    [-0.479682, -0.197104, 0.610231, 0.377078],
    [0.135032, 0.038033, 0.007375, 0.110619],
    [-0.003681, -0.307594, -0.279289, 0.094516],
    [-0.223256, 0.116216, -0.13788, 0.460914],
    [-0.108377, 0.146957, 0.189435, 0.144806],
    [0.279622, 0.714151, -0.437261, -0.39043],
    [-0.038147, -0.362699, -0.109148, -0.004736],
]
SAM_ATTN_3x4 = [
    [
        0.001158,
        0.60641,
        0.020724,
        0.003572,
        0.002822,
        0.290346,
        0.002738,
        0.003635,
        0.000567,
        0.044325,
        0.014019,
        0.009686,
    ],
    [
        0.045156,
        0.205485,
        0.076252,
        0.05423,
        0.049278,
        0.170681,
        0.112553,
        0.070475,
        0.035813,
        0.08515,
        0.062951,
        0.031977,
    ],
    [
        0.043956,
        0.510431,
        0.064041,
        0.143133,
        0.017972,
        0.071554,
        0.053812,
        0.03956,
        0.008051,
        0.031805,
        0.010017,
        0.005668,
    ],
]
SAM_ATTN_2x3 = [
    [0.004855, 0.77211, 0.072363, 0.010004, 0.10603, 0.034638],
    [0.240821, 0.208908, 0.145392, 0.153538, 0.085178, 0.166163],
    [0.240821, 0.208908, 0.145392, 0.153538, 0.085178, 0.166163],
]
REGIONS = [
    (0, [[1, 0]], [[0.0, 0.0, 13.0, 11.0]], [105]),
    (1, [[4, 2], [3, 10]], [[1.0, 1.0, 5.0, 4.0], [2.0, 7.0, 3.0, 10.0]], [20, 8]),
    (2, [[9, 7]], [[9.0, 2.0, 12.0, 9.0]], [32]),
]
PROMPT_POINTS = [[40.96, 81.9251], [1019.9041, 761.9037]]
PROMPT_BOXES = [[0.0, 0.0, 1019.9041, 761.9037], [12.288, 20.4813, 409.6, 245.7754]]
MASK_PROMPT = {
    "shape": (189, 256),
    "sum": 66.90466,
    "nonzero": 33566,
    "row": [0.0, 0.00105422, 0.00115694, 0.00125966, 0.00136238, 0.00146509],
}
MASK_EMBED_3D = [[-0.400137, -1.544234, -0.47948, -0.772898], [-0.105771, -0.697496, 0.325496, 0.312724]]
MASK_EMBED_4D = [[-0.87821, -0.878212, -0.87821, -0.87821], [0.031251, 0.031249, 0.03125, 0.03125]]
REFINED_SCORE_0 = [
    [0.0, 0.0, 0.0, 0.184994, 0.025151, 0.204845],
    [0.606633, 0.166319, 0.164136, 0.034922, 0.725789, 0.158392],
    [0.34901, 0.196898, 0.487571, 0.0, 0.208426, 0.10071],
    [0.596584, 0.334725, 0.0, 0.693469, 0.554742, 0.067214],
    [0.37198, 0.0, 0.619082, 0.045551, 0.274546, 0.431496],
]
REFINED_SCORE_2 = [
    [0.019023, 0.0, 0.0, 0.485303, 0.053327, 0.104524],
    [0.0, 0.0, 0.0, 0.411936, 0.035736, 0.645005],
    [0.0, 0.0, 0.232509, 0.017129, 0.577308, 0.0],
    [0.10955, 0.27497, 0.593558, 0.129618, 0.0, 0.663387],
    [0.0, 0.410887, 0.0, 0.507852, 0.277496, 0.363319],
]
REFINED_LABELS = [[2, 1, 2, 2, 2, 0], [0, 0, 0, 2, 0, 2], [0, 0, 0, 2, 2, 0], [0, 0, 2, 0, 0, 2], [0, 2, 0, 2, 2, 0]]
FAILED_SCORE_1 = [
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.580812, 0.436062, 0.162475, 0.0],
    [0.0, 0.0, 0.182625, 0.197751, 0.153627, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
]
POST_LABELS = [[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 2, 0]]
POST_PROBS_ROW0 = [
    [0.649361, 0.377236, 0.55859, 0.217838],
    [0.006276, 0.518017, 0.044758, 0.512587],
    [0.14885, 0.000703, 0.330913, 0.218234],
]


# ---------------------------------------------------------------------------------------------- input geometry
def test_input_size_matches_reference():
    for (h, w, p, crop), expected in INPUT_SIZES:
        assert T.input_size(h, w, patch=p, crop=crop) == expected


def test_input_size_hand_example_and_min_option():
    # VOC 375x500 at short side 448 -> 448x597; L = 597 -> 608, h = int(448·608/597) = 456 -> 464
    assert T.input_size(448, 597, patch=16) == (464, 608)
    # both sides multiples of 16 but below the crop: kept by the reference, raised with always_min
    assert T.input_size(240, 320, patch=16) == (240, 320)
    assert T.input_size(240, 320, patch=16, always_min=True) == (336, 336)
    with pytest.raises(InvalidInputError, match="patch"):
        T.input_size(10, 10, patch=0)


def test_upscale_input_is_bilinear_and_identity_when_kept():
    x = u(1, 2, 3, 20, 30)
    out = T.upscale_input(x, patch=16, crop=16)  # 30 -> 32, 20 -> int(20·32/30) = 21 -> 32
    assert out.shape == (2, 3, 32, 32)
    close(out, F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False), atol=0)
    close(out[1:], T.upscale_input(x[1:], patch=16, crop=16), atol=0)  # batch = one-by-one
    y = u(2, 1, 3, 32, 48)
    assert T.upscale_input(y, patch=16, crop=16) is y


def test_window_token_boxes_match_reference():
    for (h, w, p, crop, stride), boxes in WINDOW_BOXES:
        assert T.window_token_boxes(h, w, patch=p, window=crop, stride=stride).tolist() == boxes


def test_window_token_boxes_refuse_misaligned_windows():
    with pytest.raises(InvalidInputError, match="token"):
        T.window_token_boxes(450, 600, patch=16, window=336, stride=224)


# ---------------------------------------------------------------------------------------------- proxy attention
def test_image_proxy_weights_use_one_mean_per_image():
    feats = u(3, 4, 5, 3, 3)  # 2 images x 2 windows
    feats[0] = feats[0] * 0.3 + 1.0  # window 0 nearly uniform: its own mean is far above its image's
    out = T.image_proxy_weights(feats, windows_per_image=2, beta=1.2, gamma=3.0)
    x = F.normalize(feats.flatten(2), dim=1)
    sim = x.transpose(1, 2) @ x  # (4, 9, 9)
    for img in range(2):
        s = sim[2 * img:2 * img + 2]
        a = (s - 1.2 * s.mean()) * 3.0
        expected = torch.softmax(a.masked_fill(a < 0, float("-inf")), dim=-1)
        close(out[2 * img:2 * img + 2], expected, atol=1e-6)
    # a per-window mean (ProxyCLIP) masks more of window 0 (the mean shift itself cancels in the softmax)
    a0 = (sim[0] - 1.2 * sim[0].mean()) * 3.0
    assert ((out[0] > 0).sum() > (a0 >= 0).sum())
    # batch = one-by-one, rows sum to 1
    close(out[2:], T.image_proxy_weights(feats[2:], windows_per_image=2), atol=1e-6)
    close(out.sum(-1), torch.ones(4, 9), atol=1e-5)


def test_image_proxy_weights_uniform_image_nan_unless_diagonal_kept():
    feats = torch.ones(2, 3, 2, 2)  # every cosine is 1: β·μ = 1.2 > 1 masks every entry
    assert torch.isnan(T.image_proxy_weights(feats, windows_per_image=2)).all()
    close(T.image_proxy_weights(feats, windows_per_image=2, keep_diagonal=True), torch.eye(4).expand(2, 4, 4))
    with pytest.raises(InvalidInputError, match="whole number"):
        T.image_proxy_weights(feats, windows_per_image=3)


@pytest.mark.parametrize("g,i,ref", [(3, 3, "CUSTOM_ATTN_G3_I3"), (4, 3, "CUSTOM_ATTN_G4_I3")])
def test_window_values_match_reference_custom_attn(g, i, ref):
    """3 windows of one image: ln_1 output -> v -> proxy attention (one mean) -> out_proj, as the official
    custom_attn; g != i exercises the 24 -> 21 value resize of ViT-L/14 and ViT-H/14 in miniature."""
    d, nh = 8, 2
    attn = mha(30, d, nh)
    x = u(40, g * g, 3, d)  # (L, W, D) ln_1 output without CLS
    ex = u(50, 3, 5, i, i)
    wv, bv = attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:]
    v = F.linear(x.transpose(0, 1), wv, bv)  # (W, L, D)
    v = torch.cat([torch.zeros(3, 1, d), v], dim=1)  # a CLS row in front (dropped by the op)
    v = v.view(3, 1 + g * g, nh, d // nh).transpose(1, 2)  # (W, nh, 1+L, hd)
    with torch.no_grad():
        z = T.window_values(v, grid=(g, g), vfm_feats=ex, windows_per_image=3)  # (W, nh, M, hd)
        out = attn.out_proj(z.transpose(1, 2).reshape(3, i * i, d))  # (W, M, D)
    close(out.transpose(0, 1)[:4, :, :3], globals()[ref])


# ---------------------------------------------------------------------------------------------- splicing
def test_window_grid_ratio_rule():
    assert T.window_grid_ratio(21, 21) == (1, 21)  # ViT-B/16 with DINO-B/16 at 336
    assert T.window_grid_ratio(21, 24) == (1, 24)  # ViT-L/14, ViT-H/14: resized 21 -> 24
    assert T.window_grid_ratio(42, 21) == (2, 42)  # a multiple keeps its resolution


def test_splice_windows_sum_over_count():
    z = torch.stack([torch.full((1, 2, 3), 1.0), torch.full((1, 2, 3), 3.0)])[None]  # (1, 2, 1, 2, 3)
    boxes = torch.tensor([[0, 0, 2, 3], [0, 2, 2, 5]])  # overlap in column 2
    out = T.splice_windows(z, boxes, (2, 5))
    close(out[0, 0], [[1, 1, 2, 3, 3], [1, 1, 2, 3, 3]], atol=0)
    half = T.splice_windows(z.half(), boxes, (2, 5))
    assert half.dtype == torch.float16
    zz = u(4, 3, 2, 4, 2, 3)
    close(T.splice_windows(zz, boxes, (2, 5))[1:2], T.splice_windows(zz[1:2], boxes, (2, 5)), atol=0)
    with pytest.raises(InvalidInputError, match="does not hold"):
        T.splice_windows(z, torch.tensor([[0, 0, 2, 3], [0, 3, 2, 6]]), (2, 5))


@pytest.mark.parametrize("g,i,ref", [(3, 3, "GUIDANCE_G3_I3"), (4, 3, "GUIDANCE_G4_I3")])
def test_splice_and_aggregate_match_reference_guidance_attn(g, i, ref):
    """4 windows of g x g tokens (stride g-1) spliced and aggregated with a SAM correlation on a 3x4 grid."""
    if g == 3:
        boxes, grid = torch.tensor([(0, 0, 3, 3), (0, 2, 3, 5), (1, 0, 4, 3), (1, 2, 4, 5)]), (4, 5)
    else:
        boxes, grid = torch.tensor([(0, 0, 4, 4), (0, 3, 4, 7), (1, 0, 5, 4), (1, 3, 5, 7)]), (5, 7)
    x = u(71, i * i, 4, 8)  # custom_attn output (M, W, D)
    sam_v, sam_a = u(72, 1, 2, 3, 4, 4), softmax_rows(73, 1, 2, 12, 12)
    ratio, side = T.window_grid_ratio(i, g)
    z = T.to_window_grid(x.permute(1, 2, 0).reshape(4, 8, i, i), side)
    spliced = T.splice_windows(z[None], boxes, grid, ratio=ratio)
    w = T.sam_correlation(sam_v.flatten(2, 3), sam_a, cos_fac=1.2, refine_neg_cos=True)
    out = T.aggregate(w, spliced, (3, 4))  # (1, 12, 8)
    close(out[0, :, :4], globals()[ref])


def test_aggregate_halves_matches_reference_cityscapes_rule():
    boxes = torch.tensor([(0, 0, 3, 3), (0, 2, 3, 5), (1, 0, 4, 3), (1, 2, 4, 5)])
    x = u(74, 9, 4, 8)
    svs = [u(75, 1, 2, 3, 2, 4), u(76, 1, 2, 3, 2, 4)]
    sas = [softmax_rows(77, 1, 2, 6, 6), softmax_rows(78, 1, 2, 6, 6)]
    spliced = T.splice_windows(x.permute(1, 2, 0).reshape(1, 4, 8, 3, 3), boxes, (4, 5))
    ws = [T.sam_correlation(v.flatten(2, 3), a, cos_fac=3.0, refine_neg_cos=False) for v, a in zip(svs, sas)]
    out = T.aggregate_halves(ws, spliced, [(3, 2), (3, 2)])
    close(out[0, :, :4], GUIDANCE_HALVES)


def test_aggregate_is_w_times_resized_map_and_batched():
    w = softmax_rows(5, 2, 6, 6)
    spliced = u(6, 2, 4, 3, 5)
    out = T.aggregate(w, spliced, (2, 3))
    resized = F.interpolate(spliced, size=(2, 3), mode="bilinear", align_corners=False)
    close(out[1], w[1] @ resized[1].flatten(1).t(), atol=1e-6)
    close(out[:1], T.aggregate(w[:1], spliced[:1], (2, 3)), atol=0)


# ---------------------------------------------------------------------------------------------- SAM input
def test_sam_geometry_examples():
    assert T.sam_source_size(375, 500, patch=16) == (384, 512)
    assert T.sam_source_size(375, 500, patch=14) == (378, 504)
    assert T.sam_resize_shape(384, 512) == (768, 1024)
    assert T.sam_resize_shape(208, 304) == (701, 1024)  # 208·1024/304 = 700.6 -> 701
    assert T.sam_valid_grid((701, 1024)) == (43, 64)


def test_sam_preprocess_matches_pil_resize_and_pads_with_zero():
    from PIL import Image

    img = (u(7, 3, 60, 90, lo=0, hi=255)).round().to(torch.uint8)
    x, size = T.sam_preprocess(img[None], long_side=64)
    assert size == (43, 64) and x.shape == (1, 3, 64, 64)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((64, 43), Image.BILINEAR)
    ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
    mean = torch.tensor(T.SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(T.SAM_PIXEL_STD).view(3, 1, 1)
    ours = x[0, :, :43] * std + mean
    assert (ours - ref).abs().max() <= 1.0 + 1e-3  # PIL and PyTorch's uint8 antialias path: within one level
    assert (x[0, :, 43:] == 0).all()
    xh, _ = T.sam_preprocess(img[None], long_side=64, dtype=torch.float16)
    assert xh.dtype == torch.float16  # the reference's fp16 buffers: mean 123.6875, std 58.40625, ...
    assert torch.tensor(T.SAM_PIXEL_MEAN, dtype=torch.float16).tolist() == [123.6875, 116.25, 103.5]


# ---------------------------------------------------------------------------------------------- SAM attention
def _sam_qk(hh, ww):
    qkv_w, qkv_b = u(80, 24, 8), u(81, 24, lo=-0.1, hi=0.1)
    x = u(86, 1, hh, ww, 8)
    qkv = F.linear(x.reshape(1, hh * ww, 8), qkv_w, qkv_b).view(1, hh * ww, 3, 2, 4).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2], x


@pytest.mark.parametrize("hh,ww,ref", [(3, 4, "SAM_ATTN_3x4"), (2, 3, "SAM_ATTN_2x3")])
def test_sam_attention_matches_reference(hh, ww, ref):
    """Tables of a (3, 4) block; the (2, 3) input exercises the linear resize of the relative tables."""
    q, k, _, _ = _sam_qk(hh, ww)
    a = T.sam_attention(q, k, rel_pos_h=u(84, 5, 4), rel_pos_w=u(85, 7, 4), size=(hh, ww))
    close(a[0, 1][[0, 5, hh * ww - 1]], globals()[ref])
    rows = torch.tensor([1, 4])
    close(T.sam_attention(q, k, rel_pos_h=u(84, 5, 4), rel_pos_w=u(85, 7, 4), size=(hh, ww), rows=rows),
          a[:, :, rows], atol=1e-6)


def test_sam_attention_reproduces_timm_fused_samvit_block():
    from timm.models.vision_transformer_sam import Attention

    m = Attention(8, num_heads=2, use_rel_pos=True, input_size=(3, 4)).eval()
    with torch.no_grad():
        m.qkv.weight.copy_(u(80, 24, 8))
        m.qkv.bias.copy_(u(81, 24, lo=-0.1, hi=0.1))
        m.rel_pos_h.copy_(u(84, 5, 4))
        m.rel_pos_w.copy_(u(85, 7, 4))
        q, k, v, x = _sam_qk(3, 4)
        a = T.sam_attention(q, k, rel_pos_h=m.rel_pos_h, rel_pos_w=m.rel_pos_w, size=(3, 4))
        ours = m.proj((a @ v).transpose(1, 2).reshape(1, 12, 8)).view(1, 3, 4, 8)
        close(ours, m(x), atol=1e-5)


def test_crop_valid_keeps_top_left_block_without_renormalising():
    a = softmax_rows(8, 1, 2, 12, 12)  # grid 3x4
    v = u(9, 1, 2, 12, 5)
    ac, vc = T.crop_valid(a, v, (3, 4), (2, 3))
    keep = torch.tensor([0, 1, 2, 4, 5, 6])
    close(ac, a[:, :, keep][..., keep], atol=0)
    close(vc, v[:, :, keep], atol=0)
    assert (ac.sum(-1) < 1).all()


# ---------------------------------------------------------------------------------------------- correlation
@pytest.mark.parametrize("cos_fac,neg,ref", [(1.2, True, "SAM_SIM_12_1"), (0.0, True, "SAM_SIM_0_1"),
                                             (3.0, False, "SAM_SIM_30_0")])
def test_sam_correlation_matches_reference(cos_fac, neg, ref):
    v, a = u(60, 1, 2, 3, 4, 4), softmax_rows(61, 1, 2, 12, 12)
    w = T.sam_correlation(v.flatten(2, 3), a, cos_fac=cos_fac, refine_neg_cos=neg)
    close(w[0][[0, 1, 5, 11]], globals()[ref])
    close(w.sum(-1), torch.ones(1, 12), atol=1e-6)
    assert (w[0].diagonal() > 0).all()  # c_ii = 1 > t always keeps the diagonal
    close(T.sam_correlation(v.flatten(2, 3), a, cos_fac=cos_fac, refine_neg_cos=neg, chunk=5), w, atol=0)


@pytest.mark.parametrize("neg,ref", [(True, "SAM_SIM_NEG_1"), (False, "SAM_SIM_NEG_0")])
def test_sam_correlation_negative_thresholds_match_reference(neg, ref):
    """Rows 0-3 have negative mean cosines: kept as is with refine_neg_cos, replaced by 0.6 without it."""
    sign = torch.tensor([1.0] * 4 + [-1.0] * 8)
    v = u(62, 1, 2, 1, 4) * sign.view(1, 1, 12, 1) + 0.6 * u(63, 1, 2, 12, 4)
    w = T.sam_correlation(v, softmax_rows(61, 1, 2, 12, 12), cos_fac=1.2, refine_neg_cos=neg)
    close(w[0][:4], globals()[ref])


def test_sam_thresholds_hand_example_and_fp16_constants():
    cos = torch.tensor([[[[1.0, -0.5, -0.9]], [[1.0, -0.7, -0.9]]]])  # (1, 2 heads, 1 row, 3 keys); mean -1/6
    close(T.sam_thresholds(cos, cos_fac=1.2).flatten(), [-0.2])
    close(T.sam_thresholds(cos, cos_fac=1.2, refine_neg_cos=False).flatten(), [0.6])
    close(T.sam_thresholds(torch.ones(1, 1, 1, 3), cos_fac=1.2).flatten(), [0.9])
    t16 = T.sam_thresholds(torch.ones(1, 1, 1, 3, dtype=torch.float16), cos_fac=1.2)
    assert t16.item() == 0.89990234375  # the reference's fp16 clamp value


def test_sam_correlation_batch_equals_one_by_one():
    v, a = u(10, 2, 3, 7, 4), softmax_rows(11, 2, 3, 7, 7)
    w = T.sam_correlation(v, a)
    close(w[1:], T.sam_correlation(v[1:], a[1:]), atol=0)


def test_sam_global_weights_fused_equals_attention_crop_correlation():
    q, k, v = u(12, 2, 3, 30, 4), u(13, 2, 3, 30, 4), u(14, 2, 3, 30, 4)
    rh, rw = u(15, 9, 4), u(16, 11, 4)
    a = T.sam_attention(q, k, rel_pos_h=rh, rel_pos_w=rw, size=(5, 6))
    ac, vc = T.crop_valid(a, v, (5, 6), (3, 4))
    expected = T.sam_correlation(vc, ac, cos_fac=1.2, refine_neg_cos=False)
    fused = T.sam_global_weights(q, k, v, rel_pos_h=rh, rel_pos_w=rw, size=(5, 6), valid=(3, 4),
                                 refine_neg_cos=False, chunk=5)
    close(fused, expected, atol=1e-6)
    with pytest.raises(InvalidInputError, match="inside"):
        T.sam_global_weights(q, k, v, rel_pos_h=rh, rel_pos_w=rw, size=(5, 6), valid=(6, 4))


# ---------------------------------------------------------------------------------------------- post-processing
def test_postprocess_matches_reference():
    labels, probs = T.postprocess(0.1 * u(140, 1, 5, 3, 4)[0], num_classes=3, logit_scale=40, prob_thd=0.3)
    assert labels.tolist() == POST_LABELS
    close(probs[:, 0], POST_PROBS_ROW0)


def test_merge_first_class_synonyms_hand_example():
    p = torch.tensor([0.1, 0.4, 0.2, 0.3]).view(4, 1, 1)  # class 0 = queries 0..2, class 1 = query 3
    close(T.merge_first_class_synonyms(p, 2).flatten(), [0.4, 0.3])
    assert T.merge_first_class_synonyms(p, 4) is p
    with pytest.raises(InvalidInputError, match="num_classes"):
        T.merge_first_class_synonyms(p, 5)


# ---------------------------------------------------------------------------------------------- refinement
def _region_inputs():
    lab = torch.zeros(12, 14, dtype=torch.long)
    lab[1:5, 1:6] = 1
    lab[7:11, 2:4] = 1
    lab[6, 8] = 1
    lab[2:10, 9:13] = 2
    lab[5, 5] = 2
    probs = torch.softmax(2 * u(90, 3, 12, 14), 0)
    probs[:, 0, 0] = torch.tensor([0.1, 0.15, 0.12])
    return lab, probs


def test_coarse_regions_match_reference():
    lab, probs = _region_inputs()
    out = T.coarse_regions(lab, probs, coarse_thresh=0.2, min_area=3, down=1)
    assert out["labels_down"][0, 0] == 3  # below τ: unassigned
    for c, points, boxes, areas in REGIONS:
        assert out["points"][c].tolist() == points
        assert out["boxes"][c].tolist() == [[int(v) for v in b] for b in boxes]
        assert out["regions"][c].sum(dim=(1, 2)).tolist() == areas
    assert 1 in out["regions"] and len(out["regions"][1]) == 2  # the 1-pixel region of class 1 is dropped


def test_coarse_regions_components_agree_with_skimage():
    measure = pytest.importorskip("skimage.measure")
    lab, probs = _region_inputs()
    out = T.coarse_regions(lab, probs, coarse_thresh=0.0, min_area=1, down=1)
    for c, regions in out["regions"].items():
        sk = measure.label((lab == c).numpy(), connectivity=2)
        assert sorted(int(r.sum()) for r in regions) == sorted(int((sk == i).sum()) for i in range(1, sk.max() + 1))


def test_coarse_regions_downsample_nearest_and_bilinear():
    lab = torch.arange(16).view(4, 4) % 3
    probs = torch.softmax(u(17, 3, 4, 4), 0)
    out = T.coarse_regions(lab, probs, coarse_thresh=0.0, min_area=1, down=2)
    assert out["labels_down"].tolist() == lab[::2, ::2].tolist()  # nearest: source index 2·i
    close(out["probs_down"], F.interpolate(probs[None], size=(2, 2), mode="bilinear", align_corners=False)[0])


def test_prompt_tensors_match_reference():
    pd = torch.softmax(2 * u(91, 3, 18, 25), 0)[1]
    pts = torch.tensor([[10, 20], [249, 186]])
    bxs = torch.tensor([[0, 0, 249, 186], [3, 5, 100, 60]])
    # coordinates are scaled from a (187, 250) grid; the mask from (18, 25) to the frame of a 37x50 image
    out = T.prompt_tensors(pts, bxs, torch.zeros(187, 250), image_size=(37, 50), coarse_thresh=0.2)
    close(out["point_coords"][:, 0], PROMPT_POINTS, atol=1e-3)
    close(out["boxes"], PROMPT_BOXES, atol=1e-3)
    assert out["point_labels"].tolist() == [[1.0], [1.0]]
    m = T.prompt_tensors(pts, bxs, pd, image_size=(37, 50), coarse_thresh=0.2)["mask_input"]
    assert m.shape == (1, 256, 256) and T.sam_resize_shape(37, 50, 256) == MASK_PROMPT["shape"]
    assert int((m != 0).sum()) == MASK_PROMPT["nonzero"]
    close(m.sum(), MASK_PROMPT["sum"], atol=1e-3)
    close(m[0, 40, 100:106], MASK_PROMPT["row"], atol=1e-8)
    mb = T.prompt_tensors(pts, bxs, pd, image_size=(37, 50), coarse_thresh=0.2, batched_mask=True)["mask_input"]
    assert mb.shape == (2, 1, 256, 256) and torch.equal(mb[1], m)


def _mask_params():
    shapes = [("0.weight", (2, 1, 2, 2)), ("0.bias", (2,)), ("1.weight", (2,)), ("1.bias", (2,)),
              ("3.weight", (8, 2, 2, 2)), ("3.bias", (8,)), ("4.weight", (8,)), ("4.bias", (8,)),
              ("6.weight", (8, 8, 1, 1)), ("6.bias", (8,))]
    params = {}
    for k, (name, shape) in enumerate(shapes):  # same order and offsets as the official state dict
        is_ln_weight = name.endswith("weight") and len(shape) == 1
        params["mask_downscaling." + name] = u(100 + k, *shape, lo=-0.5, hi=0.5) + (1.0 if is_ln_weight else 0.0)
    return params


def test_mask_downscale_reproduces_reference_3d_quirk_and_batched_layout():
    mask = 0.005 * u(120, 1, 16, 16, lo=0.0, hi=1.0)
    e3 = T.mask_downscale(mask, _mask_params())
    e4 = T.mask_downscale(mask[None].expand(2, -1, -1, -1), _mask_params())
    assert e3.shape == (8, 4, 4) and e4.shape == (2, 8, 4, 4)
    close(e3[:2, 0], MASK_EMBED_3D)
    close(e4[0, :2, 0], MASK_EMBED_4D)
    assert not torch.allclose(e3, e4[0], atol=1e-2)  # the quirk changes the dense prompt a lot


def test_refinement_merge_matches_reference():
    h, w = 5, 6
    logits = u(130, 3, 1, h, w, lo=-3, hi=3)
    seg = torch.softmax(2 * u(131, 3, h, w), 0)
    # class 0 kept regions 0 and 1, class 1 none, class 2 region 2
    scores = torch.stack([T.refined_class_score(logits[0:2, 0], seg[0]), torch.zeros(h, w),
                          T.refined_class_score(logits[2:3, 0], seg[2])])
    close(scores[0], REFINED_SCORE_0)
    close(scores[2], REFINED_SCORE_2)
    coarse = torch.arange(h * w).view(h, w) % 3
    labels = T.merge_refinement(scores, coarse)
    assert labels.tolist() == REFINED_LABELS
    failed = torch.zeros(h, w, dtype=torch.bool)
    failed[1:3, 2:5] = True
    close(T.merge_failed_regions(scores, failed, seg)[1], FAILED_SCORE_1)


def test_sam_masks_to_image_shapes_and_constant_logits():
    low = torch.full((2, 1, 16, 16), 0.7)
    out = T.sam_masks_to_image(low, input_size=(48, 64), original_size=(30, 40), image_size=(29, 41), long_side=64)
    assert out.shape == (2, 1, 29, 41)
    close(out, torch.full_like(out, 0.7), atol=1e-6)
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    same = T.sam_masks_to_image(ramp, input_size=(64, 64), original_size=(16, 16), image_size=(16, 16), long_side=64)
    # up then down by the same factor: a linear ramp comes back, except at the clamped borders
    close(same[..., 1:-1], ramp[..., 1:-1], atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(InvalidInputError, match="uint8"):
        T.sam_preprocess(torch.zeros(1, 3, 8, 8))
    with pytest.raises(InvalidInputError, match="batch mismatch"):
        T.window_values(torch.zeros(2, 1, 10, 4), grid=(3, 3), vfm_feats=torch.zeros(3, 5, 3, 3), windows_per_image=1)
    with pytest.raises(InvalidInputError, match="do not match"):
        T.aggregate(torch.zeros(1, 6, 6), torch.zeros(1, 4, 3, 3), (2, 2))
    with pytest.raises(InvalidInputError, match="two halves"):
        T.aggregate_halves([torch.zeros(1, 4, 4)], torch.zeros(1, 4, 3, 4), [(2, 2)])
    with pytest.raises(InvalidInputError, match="mask prompt"):
        T.mask_downscale(torch.zeros(256, 256), _mask_params())
    with pytest.raises(InvalidInputError, match="expected v"):
        T.sam_correlation(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4))
    with pytest.raises(InvalidInputError, match="tokens"):
        T.sam_attention(torch.zeros(1, 2, 11, 4), torch.zeros(1, 2, 11, 4), rel_pos_h=torch.zeros(5, 4),
                        rel_pos_w=torch.zeros(7, 4), size=(3, 4))


def test_image_mean_from_window_sums_in_two_batches():
    """Windows of one image run in two batches: the summed per-window S totals give the same mean and weights."""
    feats = u(18, 4, 6, 3, 3)  # one image, 4 windows
    full = T.image_proxy_weights(feats, windows_per_image=4)
    x = F.normalize(feats.flatten(2), dim=1)
    close(T.window_similarity_sums(feats), (x.transpose(1, 2) @ x).sum(dim=(1, 2)), atol=1e-5)
    total = T.window_similarity_sums(feats[:2]).sum() + T.window_similarity_sums(feats[2:]).sum()
    mu = (total / (4 * 9 * 9)).expand(2)
    parts = torch.cat([T.image_proxy_weights(feats[:2], windows_per_image=1, mean=mu),
                       T.image_proxy_weights(feats[2:], windows_per_image=1, mean=mu)])
    close(parts, full, atol=1e-6)
    with pytest.raises(InvalidInputError, match="one value per window"):
        T.image_proxy_weights(feats, windows_per_image=4, mean=mu)


# ------------------------------------------------------------------------------------------------ phase 2 additions
# OpenCV 5.0's cv2.resize(img, (9, 8)) and (4, 3) (INTER_LINEAR) of this seeded 5x7 uint8 image
CV2_IMG = [[172, 47, 117, 192, 67, 251, 195], [103, 9, 211, 21, 242, 36, 87], [70, 216, 88, 140, 58, 193, 230],
           [39, 87, 174, 88, 81, 165, 25], [77, 72, 9, 148, 115, 208, 243]]
CV2_UP = [[172, 89, 78, 134, 192, 95, 169, 232, 195], [142, 67, 87, 149, 117, 138, 151, 154, 148],
          [101, 48, 102, 164, 28, 186, 128, 62, 96], [80, 128, 140, 121, 103, 113, 131, 158, 185],
          [60, 137, 149, 117, 124, 78, 131, 178, 166], [41, 77, 128, 151, 91, 82, 128, 124, 38],
          [60, 72, 80, 90, 122, 105, 150, 175, 147], [77, 74, 44, 40, 148, 122, 167, 219, 243]]
CV2_DOWN = [[106, 146, 126, 166], [125, 95, 68, 216], [69, 72, 107, 179]]


def test_resize_linear_uint8_reproduces_opencv():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (5, 7), generator=g, dtype=torch.uint8)
    assert img.tolist() == CV2_IMG
    assert T.resize_linear_uint8(img, (8, 9)).tolist() == CV2_UP
    assert T.resize_linear_uint8(img, (3, 4)).tolist() == CV2_DOWN
    assert T.resize_linear_uint8(img, (5, 7)) is img  # same size: unchanged
    # channels first, any leading dims, each channel on its own
    rgb = torch.stack([img, 255 - img, img.flip(0)])
    out = T.resize_linear_uint8(rgb, (8, 9))
    assert out[0].tolist() == CV2_UP and out[1].tolist() == T.resize_linear_uint8(255 - img, (8, 9)).tolist()
    # torch's own uint8 bilinear rounds differently (why the reference's SAM picture needs this rule)
    plain = F.interpolate(img[None, None], size=(8, 9), mode="bilinear", align_corners=False)[0, 0]
    assert (plain != torch.tensor(CV2_UP, dtype=torch.uint8)).any()
    with pytest.raises(InvalidInputError, match="uint8"):
        T.resize_linear_uint8(img.float(), (8, 9))


def test_resize_linear_uint8_equals_cv2_on_sam_pictures():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.RandomState(0)
    for t in range(20):
        h, w = rng.randint(20, 400, 2)
        p = (14, 16)[t % 2]
        size = T.sam_source_size(int(h), int(w), patch=p)
        img = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
        ref = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        ours = T.resize_linear_uint8(torch.from_numpy(img).permute(2, 0, 1), size).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(ours, ref)


def test_sam_rel_bias_rows_equal_timm_decomposed_bias():
    from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias

    h, w, nh, hd = 5, 7, 3, 4
    q = u(40, 2, nh, h * w, hd)
    rh, rw = u(41, 2 * h - 1, hd), u(42, 2 * w - 1, hd)
    full = get_decomposed_rel_pos_bias(q.reshape(2 * nh, h * w, hd), rh, rw, (h, w), (h, w)).view(2, nh, h * w, h * w)
    rows = torch.tensor([0, 6, 13, 34])
    got = T.sam_rel_bias(q[:, :, rows], rel_pos_h=rh, rel_pos_w=rw, rows=rows, size=(h, w))
    torch.testing.assert_close(got, full[:, :, rows], rtol=1e-6, atol=1e-6)


def test_class_regions_is_coarse_regions_per_class():
    lab = torch.zeros(12, 14, dtype=torch.long)
    lab[1:5, 1:6] = 1
    lab[7:11, 8:13] = 1
    lab[6, 0] = 1  # a single pixel: below min_area
    probs = torch.softmax(u(43, 2, 12, 14) * 4, dim=0)
    out = T.coarse_regions(lab, probs, coarse_thresh=0.0, min_area=4, down=1)
    m, pts, boxes = T.class_regions(lab == 1, probs[1], min_area=4)
    assert m.shape == (2, 12, 14) and torch.equal(m, out["regions"][1])
    assert torch.equal(pts, out["points"][1]) and torch.equal(boxes, out["boxes"][1])
    assert boxes.tolist() == [[1, 1, 5, 4], [8, 7, 12, 10]]  # x1, y1, x2, y2 with inclusive maxima
    assert T.class_regions(lab == 1, probs[1], min_area=100) is None
    assert T.class_regions(torch.zeros(3, 3, dtype=torch.bool), probs[1, :3, :3]) is None
