"""SC-CLIP operations (ovseg.ops.scclip): hand-computed examples, invariances, batch = one-by-one, and agreement
with numbers produced by the official code (SuleBai/SC-CLIP 0417ba9, CPU fp32) on the same integer-generated
inputs and weights (tests/unit/_tiny_reference_clip.py)."""
import math

import pytest
import torch

from ovseg.errors import InvalidInputError
from ovseg.ops import scclip as sc
from ovseg.segmenter import postprocess

from ._tiny_reference_clip import (
    QUERY_CLASS,
    build_tiny_clip,
    integer_text,
    ints,
    normalize,
    run_trunk,
    synthetic_image,
)

# fp32 results of the official functions on the inputs rebuilt below (7 significant digits)
OFFICIAL_LOF_IDX = [3, 17, 21, 31]
OFFICIAL_LOF_SCORES = [
    0.9693009, 1.008886, 1.023485, 14.8311, 0.9153383, 1.092782, 1.286574, 1.198925, 1.113084, 0.9841893,
    1.407806, 0.7255155, 0.8481587, 1.1415, 1.143126, 0.9648131, 1.294932, 9.905245, 0.9378682, 1.184702,
    1.294957, 1.919061, 1.195407, 0.9311322, 1.101699, 0.9109932, 1.066097, 1.43948, 1.111645, 1.005518,
    1.195428, 3.117837, 1.303447, 1.119503, 1.080136, 1.455285, 0.9724123, 1.177962, 0.8210629, 1.020442,
]
OFFICIAL_GUIDED_ATTN = [
    [0.5600197, -0.1008072, 0.4221757, -0.8962957, -0.5220162, -0.07850429, 0.4990623, 0.8266694],
    [0.9083874, -0.4137775, 0.3874839, -0.555841, -0.6948434, 0.5926029, 0.6945342, 0.9921788],
    [0.8048175, -0.55891, 0.346077, -1.020911, -0.7184296, 0.2124121, 0.46003, 0.8756217],
    [0.8193585, -0.1002504, 0.3725937, -0.5765282, -0.4580686, -0.003493637, 0.1882632, 0.9631364],
    [0.7569855, 0.1419636, 0.3720882, -0.4754055, -0.4686169, 0.4826024, 0.8488319, 1.187128],
    [0.4347749, 0.4538752, 0.8341791, 0.1750183, -0.6329491, 0.4379663, 0.7855513, 0.6048458],
]
OFFICIAL_REPAIR = [  # mean_interpolation of ints((1, 2, 4, 5), 31, -20, 21, 1) with 5 anomalies
    [[-2.333333, 12.0, -16.0, -15.0, 13.0], [-10.0, -9.0, -5.0, -7.857143, -7.0],
     [3.8, 9.0, -20.0, 4.0, -14.0], [20.0, 9.0, 9.0, -18.0, -9.333333]],
    [[-4.333333, -13.0, -10.0, 0.0, 4.0], [-20.0, 20.0, 2.857143, -0.2857143, -5.0],
     [1.2, 11.0, 6.0, 6.0, -3.0], [13.0, -18.0, 7.0, 18.0, 7.0]],
]
OFFICIAL_AGGREGATE = [
    [1.875784, 1.574132, -3.618762], [0.7360094, 1.656021, 1.02798], [-3.999996, -4.999995, 1.999998],
    [2.789487, 3.177626, -4.144742], [1.186086, -0.5808766, -3.186085], [1.263989, 2.843976, -0.02798039],
]
OFFICIAL_VOC21_PRED = [
    [1, 1, 1, 1, 2, 4, 2, 2], [1, 4, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 2, 2, 2, 2],
    [1, 1, 2, 1, 2, 4, 4, 2], [1, 1, 1, 1, 2, 2, 1, 2], [1, 1, 1, 1, 0, 0, 4, 4],
]
OFFICIAL_VOC21_SCORES = {(1, 1): [0.001589644, 0.06759339, 0.1726058, 0.0, 0.3770057],
                         (5, 6): [7.239763e-05, 0.001647762, 2.929538e-08, 0.0, 0.997916]}


def _lof_input():
    x = ints((40, 8), 11, -1000, 1000, 256.0)
    x[[3, 17, 31]] += torch.tensor([9.0, -7.0, 6.0]).view(3, 1)
    return x


# ------------------------------------------------------------------ LOF
def test_lof_scores_hand_example():
    # five points on a line (no distance ties), k = 2: kd(i) = squared distance to the 2nd nearest other point
    pts = [0.0, 1.0, 3.0, 7.0, 15.0]
    x = torch.tensor(pts).view(1, 5, 1)
    knn = []
    for i, p in enumerate(pts):
        others = sorted((abs(p - q) ** 2, j) for j, q in enumerate(pts) if j != i)
        knn.append(others[:2])
    kd = [nn[-1][0] for nn in knn]
    assert kd == [9.0, 4.0, 9.0, 36.0, 144.0]
    expected = [sum(kd[i] / kd[j] for _, j in knn[i]) / 2 for i in range(5)]  # reach distance = own kd(i)
    got = sc.lof_scores(x, n_neighbors=2)[0]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=0)
    assert got[4].item() == pytest.approx((144 / 36 + 144 / 9) / 2)  # the far point: neighbours 7 and 3
    # scikit-learn's LOF uses reach(i, o) = max(d(i, o), kd(o)) on plain distances; the code's variant gives
    # kd(i) / kd(o) ratios of squared distances instead, e.g. for the point at 0:
    assert got[0].item() == pytest.approx((9 / 4 + 9 / 9) / 2)


def test_lof_matches_official_lof_pytorch():
    scores = sc.lof_scores(_lof_input()[None], n_neighbors=5)[0]
    torch.testing.assert_close(scores, torch.tensor(OFFICIAL_LOF_SCORES), rtol=2e-6, atol=0)
    mask = sc.lof_anomalies(_lof_input()[None], n_neighbors=5, contamination=0.1)[0]
    assert mask.nonzero().flatten().tolist() == OFFICIAL_LOF_IDX


@pytest.mark.parametrize("n, expected", [(196, 10), (256, 13), (144, 8)])
def test_lof_anomaly_count_is_the_quantile_count(n, expected):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(1, n, 16, generator=g)
    assert int(sc.lof_anomalies(x).sum()) == expected  # strictly above the linear 95 % quantile


def test_lof_batch_equals_one_by_one_and_chunked_distances_are_exact():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 60, 12, generator=g)
    together = sc.lof_scores(x, n_neighbors=30)
    for b in range(3):
        assert torch.equal(together[b], sc.lof_scores(x[b:b + 1], n_neighbors=30)[0])
    full = torch.linalg.vector_norm(x[:, :, None] - x[:, None], dim=-1) ** 2
    assert torch.equal(sc._pairwise_sq_dist(x, chunk_elems=100), full)


def test_lof_bad_input():
    with pytest.raises(InvalidInputError, match="n_neighbors"):
        sc.lof_scores(torch.randn(1, 30, 4), n_neighbors=30)
    with pytest.raises(InvalidInputError, match="contamination"):
        sc.lof_anomalies(torch.randn(1, 40, 4), contamination=1.5)
    with pytest.raises(InvalidInputError, match=r"\(B, N, D\)"):
        sc.lof_scores(torch.randn(40, 4))


# ------------------------------------------------------------------ repair
def test_repair_hand_example():
    # 2x3 grid, D = 1:  [[1, 2, 3], [4, 50, 6]] with anomalies at 50 (1,1) and 3 (0,2)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 50.0, 6.0]).view(1, 6, 1)
    anom = torch.tensor([[False, False, True, False, True, False]])
    out = sc.repair_anomalies(x, anom, (2, 3))[0, :, 0]
    # (1,1): valid neighbours 1, 2, 4, 6 (3 is anomalous) -> 13/4; (0,2): valid 2, 6 (50 anomalous) -> 4
    assert out.tolist() == [1.0, 2.0, 4.0, 4.0, 3.25, 6.0]


def test_repair_keeps_an_anomaly_without_valid_neighbour():
    x = torch.tensor([7.0, 8.0, 9.0]).view(1, 3, 1)
    anom = torch.tensor([[True, True, False]])
    out = sc.repair_anomalies(x, anom, (1, 3))[0, :, 0]
    assert out.tolist() == [7.0, 9.0, 9.0]  # token 0's only neighbour is anomalous: kept


def test_repair_matches_official_mean_interpolation():
    fmap = ints((1, 2, 4, 5), 31, -20, 21, 1.0)  # (1, C, gh, gw)
    x = fmap.flatten(2).transpose(1, 2)  # (1, 20, 2)
    anom = torch.zeros(1, 20, dtype=torch.bool)
    for r, c in [(0, 0), (1, 2), (1, 3), (3, 4), (2, 0)]:
        anom[0, r * 5 + c] = True
    out = sc.repair_anomalies(x, anom, (4, 5))[0].transpose(0, 1).reshape(2, 4, 5)
    torch.testing.assert_close(out, torch.tensor(OFFICIAL_REPAIR), rtol=1e-6, atol=1e-6)


def test_reference_positions_square_identity_and_non_square_mapping():
    anom = torch.zeros(2, 9, dtype=torch.bool)
    anom[0, [1, 5]] = True
    anom[1, 7] = True
    assert torch.equal(sc.reference_anomaly_positions(anom, (3, 3)), anom)
    # gh = 3 > gw = 2: token t goes to (t // 3, t % 3) -> row-major r * 2 + c
    a = torch.zeros(1, 6, dtype=torch.bool)
    a[0, [1, 3]] = True  # (0, 1) -> 1 ; (1, 0) -> 2
    assert sc.reference_anomaly_positions(a, (3, 2)).nonzero()[:, 1].tolist() == [1, 2]
    a = torch.zeros(1, 6, dtype=torch.bool)
    a[0, 2] = True  # (0, 2): column 2 outside a 2-wide grid -> the reference fails
    with pytest.raises(InvalidInputError, match="outside the grid"):
        sc.reference_anomaly_positions(a, (3, 2))


# ------------------------------------------------------------------ similarity, re-aggregation, attention
def test_cosine_and_reaggregation_hand_example():
    x = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])
    s = sc.cosine_similarity(x)[0]
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(s, torch.tensor([[1.0, r, 0.0], [r, 1.0, r], [0.0, r, 1.0]]))
    w = sc.reaggregation_weights(s[None], beta=0.75)[0]  # r = 0.707 < 0.75 is cut
    torch.testing.assert_close(w, torch.eye(3) / (1 + 1e-6))
    w = sc.reaggregation_weights(s[None], beta=0.4)[0]
    torch.testing.assert_close(w[1], torch.tensor([r, 1.0, r]) / (1 + 2 * r + 1e-6))
    assert torch.equal(sc.reaggregation_weights(torch.full((1, 2, 2), 0.1))[0], torch.zeros(2, 2))  # all cut


def test_reaggregation_matches_official_adaptively_aggregate():
    f = ints((1, 6, 5), 26, -32, 33, 16.0)
    sim = sc.cosine_similarity(f)
    feats = ints((6, 1, 3), 41, -10, 11, 2.0)[:, 0][None]  # (1, 6, 3)
    out = sc.reaggregation_weights(sim, beta=0.4) @ feats
    torch.testing.assert_close(out[0], torch.tensor(OFFICIAL_AGGREGATE), rtol=1e-5, atol=1e-6)


def test_guided_attention_weights_hand_example():
    s = torch.tensor([[1.0, 0.5, -0.2], [0.5, 1.0, 0.1], [-0.2, 0.1, 1.0]])
    k = torch.zeros(1, 2, 3, 4)  # k kᵀ = 0: the k-k softmax is uniform
    w = sc.guided_attention_weights(s[None], k)[0]
    m = s.mean().item()
    for i in range(3):
        logits = [3 * (s[i, j].item() - m) for j in range(3)]
        ex = [math.exp(v) if v >= 0 else 0.0 for v in logits]  # negatives masked to -inf
        g = [e / sum(ex) for e in ex]
        for h in range(2):
            torch.testing.assert_close(w[h, i], torch.tensor([(gj + 1 / 3) / 2 for gj in g]))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))


def test_guided_attention_matches_official_custom_attn():
    w_in, b_in = ints((24, 8), 21, -64, 65, 128.0), ints((24,), 22, -16, 17, 64.0)
    w_out, b_out = ints((8, 8), 23, -64, 65, 128.0), ints((8,), 24, -16, 17, 64.0)
    z = ints((6, 1, 8), 25, -32, 33, 16.0).transpose(0, 1)  # (1, 6, 8)
    sim = sc.cosine_similarity(ints((1, 6, 5), 26, -32, 33, 16.0))
    out = sc.guided_attention(z, sim, in_proj_weight=w_in, in_proj_bias=b_in, out_proj_weight=w_out,
                              out_proj_bias=b_out, num_heads=2)
    torch.testing.assert_close(out[0], torch.tensor(OFFICIAL_GUIDED_ATTN), rtol=1e-5, atol=2e-6)


def test_guided_attention_batch_equals_one_by_one():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 10, 16, generator=g)
    sim = sc.cosine_similarity(torch.randn(3, 10, 6, generator=g))
    w_in, w_out = torch.randn(48, 16, generator=g) / 4, torch.randn(16, 16, generator=g) / 4
    kw = dict(in_proj_weight=w_in, in_proj_bias=None, out_proj_weight=w_out, out_proj_bias=None, num_heads=2)
    together = sc.guided_attention(z, sim, **kw)
    for b in range(3):
        torch.testing.assert_close(together[b:b + 1], sc.guided_attention(z[b:b + 1], sim[b:b + 1], **kw),
                                   rtol=1e-6, atol=1e-6)


def test_fusion_sum_and_layers():
    outs = {i: torch.full((1, 3, 2), float(i)) for i in range(1, 12)}
    assert torch.equal(sc.fusion_sum(outs, (4, 10)), torch.full((1, 3, 2), float(sum(range(4, 11)))))
    assert sc.scclip_layers(12) == (4, 5, 6, 7, 8, 9, 10, 11)
    assert sc.scclip_layers(24, pre_layer=17, post_layer=7, fusion_layers=(9, 19)) == (7,) + tuple(range(9, 20)) + (23,)
    with pytest.raises(InvalidInputError, match="missing"):
        sc.fusion_sum({4: outs[4]}, (4, 5))
    with pytest.raises(InvalidInputError, match="not blocks"):
        sc.scclip_layers(8)


# ------------------------------------------------------------------ the whole last layer, tiny CLIP
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def _window_logits(clip, crops, **kw):
    outs, _, grid = run_trunk(clip, crops)
    with torch.no_grad():
        tokens, inter = sc.scclip_tokens(outs, grid, clip.visual.transformer.resblocks[-1], num_layers=12,
                                         return_intermediates=True, **kw)
        feats = clip.project(tokens)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = (feats @ integer_text().t()).transpose(1, 2).reshape(crops.shape[0], -1, *grid)
    return feats, logits, inter


def _upsampled(logits, size):
    return torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)


# official SC-CLIP on the tiny checkpoint: encode_image rows [0, 42, 59, 100, last], channels 0-4, and the window
# logits of the 7 queries at pixels (8, 8) and (120, 100)
OFFICIAL_SQUARE = dict(
    anomalies=[59, 60, 70, 71, 75, 76, 77, 78, 79, 186],
    feats=[[0.9063861, -0.5825286, -2.095652, -0.138539, -0.8009642],
           [0.9078225, -0.5818701, -2.097599, -0.1405116, -0.8029953],
           [0.9068099, -0.5764772, -2.090466, -0.1439483, -0.7881065],
           [0.6772453, -0.4681133, -1.906644, 0.01012241, -0.4972764],
           [0.6782503, -0.4688421, -1.908118, 0.009491094, -0.4990368]],
    px=[[-0.07445519, -0.03804867, 0.06524307, 0.05472161, 0.1448973, 0.1308662, -0.1528322],
        [-0.05289842, -0.06846064, 0.05792738, 0.04678877, 0.1352107, 0.1668669, -0.1524776]],
)
OFFICIAL_TALL = dict(  # a 224x160 window (14x10 grid): the reference repairs at (t // 14, t % 14)
    anomalies=[42, 43, 50, 51, 56, 103, 120],
    repaired_at=[30, 31, 38, 39, 40, 75, 88],
    feats=[[0.9151984, -0.5831512, -2.139988, -0.1487952, -0.8057332],
           [0.9243373, -0.5791869, -2.140178, -0.1612152, -0.8029132],
           [0.9201964, -0.5802347, -2.142275, -0.1561354, -0.8071344],
           [0.6739427, -0.4637468, -1.957733, 0.00735474, -0.4983557],
           [0.6731622, -0.4632159, -1.957289, 0.007996486, -0.4976316]],
    px=[[-0.07862187, -0.03879803, 0.06405553, 0.04949211, 0.1442053, 0.1336601, -0.14833],
        [-0.07378504, -0.04508314, 0.0620281, 0.04848801, 0.1423264, 0.1401919, -0.1481407]],
)
ROWS = [0, 42, 59, 100, -1]


def _feat_rows(feats_unnormalised):
    return feats_unnormalised[0, ROWS, :5]


@pytest.mark.parametrize("case", ["square", "tall"])
def test_scclip_tokens_match_official_code(tiny_clip, case):
    ref = OFFICIAL_SQUARE if case == "square" else OFFICIAL_TALL
    size = (224, 224) if case == "square" else (224, 160)
    crops = normalize(synthetic_image(*size, seed=0))
    outs, _, grid = run_trunk(tiny_clip, crops)
    with torch.no_grad():
        tokens, inter = sc.scclip_tokens(outs, grid, tiny_clip.visual.transformer.resblocks[-1], num_layers=12,
                                         reference_positions=True, return_intermediates=True)
        feats = tiny_clip.project(tokens)
    assert inter["anomalies"][0].nonzero().flatten().tolist() == ref["anomalies"]
    if case == "tall":
        assert inter["repaired_at"][0].nonzero().flatten().tolist() == ref["repaired_at"]
    # float32 through 12 blocks on another code path (open_clip vs OpenAI): ~2e-6 observed
    torch.testing.assert_close(_feat_rows(feats), torch.tensor(ref["feats"]), rtol=0, atol=3e-5)
    unit = feats / feats.norm(dim=-1, keepdim=True)
    logits = _upsampled((unit @ integer_text().t()).transpose(1, 2).reshape(1, -1, *grid), size)
    got = torch.stack([logits[0, :, 8, 8], logits[0, :, 120, 100]])
    torch.testing.assert_close(got, torch.tensor(ref["px"]), rtol=0, atol=2e-6)


def test_scclip_non_square_corrected_positions_differ_from_the_reference(tiny_clip):
    crops = normalize(synthetic_image(224, 160, seed=0))
    feats, _, inter = _window_logits(tiny_clip, crops)  # reference_positions=False: row-major repair
    assert torch.equal(inter["repaired_at"], inter["anomalies"])
    with torch.no_grad():
        raw = tiny_clip.project(sc.scclip_tokens(run_trunk(tiny_clip, crops)[0], (14, 10),
                                                 tiny_clip.visual.transformer.resblocks[-1], num_layers=12))
    assert (_feat_rows(raw) - torch.tensor(OFFICIAL_TALL["feats"])).abs().max() > 1e-2


def test_scclip_reference_positions_fail_where_the_official_code_fails(tiny_clip):
    # seed 3: the official code raises "IndexError: index 13 is out of bounds for dimension 1 with size 10"
    crops = normalize(synthetic_image(224, 160, seed=3))
    outs, _, grid = run_trunk(tiny_clip, crops)
    block = tiny_clip.visual.transformer.resblocks[-1]
    with pytest.raises(InvalidInputError, match=r"at \(row, col\) = \(\d+, 1[0-3]\), outside the grid"):
        sc.scclip_tokens(outs, grid, block, num_layers=12, reference_positions=True)
    with torch.no_grad():
        assert torch.isfinite(sc.scclip_tokens(outs, grid, block, num_layers=12)).all()  # corrected positions


def test_scclip_tokens_square_grid_positions_agree(tiny_clip):
    crops = normalize(synthetic_image(224, 224, seed=0))
    outs, _, grid = run_trunk(tiny_clip, crops)
    block = tiny_clip.visual.transformer.resblocks[-1]
    with torch.no_grad():
        a = sc.scclip_tokens(outs, grid, block, num_layers=12)
        b = sc.scclip_tokens(outs, grid, block, num_layers=12, reference_positions=True)
    assert torch.equal(a, b)


def test_scclip_batch_equals_one_by_one_and_is_deterministic(tiny_clip):
    crops = torch.cat([normalize(synthetic_image(224, 224, seed=0)), normalize(synthetic_image(224, 224, seed=2))])
    feats, logits, inter = _window_logits(tiny_clip, crops)
    for b in range(2):
        f1, l1, i1 = _window_logits(tiny_clip, crops[b:b + 1])
        assert torch.equal(inter["anomalies"][b], i1["anomalies"][0])
        torch.testing.assert_close(feats[b:b + 1], f1, rtol=0, atol=1e-5)
    f2, l2, _ = _window_logits(tiny_clip, crops)
    assert torch.equal(feats, f2) and torch.equal(logits, l2)
    assert int(inter["anomalies"].sum(dim=1).min()) == 10  # 196 tokens -> 10 anomalies each


def test_scclip_tokens_missing_block_is_a_clear_error(tiny_clip):
    crops = normalize(synthetic_image(224, 224, seed=0))
    outs, _, grid = run_trunk(tiny_clip, crops)
    del outs[9]
    with pytest.raises(InvalidInputError, match="lacks block 9"):
        sc.scclip_tokens(outs, grid, tiny_clip.visual.transformer.resblocks[-1], num_layers=12)


# ------------------------------------------------------------------ VOC area filter
def test_area_filter_hand_example():
    # C = 3 on 1x20 pixels: bg wins 2, class 1 wins 17, class 2 wins 1 (1 <= 0.1 * 18 -> dropped)
    s = torch.zeros(3, 1, 20)
    s[0, 0, :2] = 0.9
    s[1, 0, 2:19] = 0.8
    s[2, 0, 19] = 0.7
    s[1, 0, 19] = 0.2
    out = sc.area_filter(s, area_thd=0.1)
    assert torch.equal(out[0], s[0]) and torch.equal(out[1], s[1])
    assert torch.equal(out[2], torch.zeros(1, 20))
    assert out.argmax(0)[0].tolist() == [0, 0] + [1] * 18
    assert torch.equal(sc.area_filter(s, area_thd=0.05), s)  # 1 > 0.05 * 18: kept


def test_area_filter_matches_official_postprocess_and_batches():
    lg = ints((7, 6, 8), 61, -8, 9, 64.0)
    lg[2, :, :4] += 0.2
    lg[3, :5, 4:] += 0.2
    lg[5, 5, 6:] += 0.3
    lg[0, 5, 4:6] += 0.3
    _, scores = postprocess(lg, QUERY_CLASS, 5, logit_scale=50.0, threshold=0.0)  # softmax + synonym max
    scores = sc.area_filter(scores, area_thd=0.1)
    best, labels = scores.max(dim=0)
    labels[best < 0.15] = 0
    assert labels.tolist() == OFFICIAL_VOC21_PRED
    for (y, x), ref in OFFICIAL_VOC21_SCORES.items():
        torch.testing.assert_close(scores[:, y, x], torch.tensor(ref), rtol=1e-5, atol=1e-8)
    batch = torch.stack([scores, scores.flip(-1)])
    together = sc.area_filter(batch)
    assert torch.equal(together[1], sc.area_filter(scores.flip(-1)))
    with pytest.raises(InvalidInputError, match="C >= 2"):
        sc.area_filter(torch.rand(1, 4, 4))
