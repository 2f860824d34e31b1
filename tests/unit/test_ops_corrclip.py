"""CorrCLIP's operations (ovseg.ops.corrclip) against hand-computed examples, their definitions, and numbers
dumped from the official code (CorrCLIP v1 run on CPU in fp32)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from ovseg.errors import InvalidInputError, InvalidTypeError
from ovseg.ops import corrclip as cc
from ovseg.segmenter import postprocess


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ region maps
def test_resize_region_map_picks_one_pixel_per_cell():
    r = torch.arange(16).view(1, 4, 4)
    # output (i, j) takes input (floor(i*4/2), floor(j*4/2)) = (2i, 2j): the top-left pixel of each 2x2 cell
    assert cc.resize_region_map(r, (2, 2)).tolist() == [[[0, 2], [8, 10]]]
    # up-sampling repeats; non-integer factors follow floor(dst * in / out)
    assert cc.resize_region_map(torch.tensor([[[3, 7]]]), (1, 4)).tolist() == [[[3, 3, 7, 7]]]
    r = torch.arange(5).view(1, 1, 5)
    assert cc.resize_region_map(r, (1, 3)).tolist() == [[[0, 1, 3]]]  # floor(j * 5/3) = 0, 1, 3
    assert cc.resize_region_map(r, (1, 5)) is r
    assert cc.resize_region_map(r.int(), (1, 3)).dtype == torch.int32


def test_resize_region_map_rejects_bad_maps():
    with pytest.raises(InvalidTypeError, match="integer"):
        cc.resize_region_map(torch.zeros(1, 2, 2), (1, 1))
    with pytest.raises(InvalidInputError, match="2\\*\\*24"):
        cc.resize_region_map(torch.full((1, 2, 2), 1 << 25), (1, 1))
    with pytest.raises(InvalidInputError, match="B, H, W"):
        cc.resize_region_map(torch.zeros(2, 2, dtype=torch.long), (1, 1))


def test_pad_region_map_uses_the_pad_region():
    r = torch.ones(1, 2, 3, dtype=torch.long)
    p = cc.pad_region_map(r, (1, 2, 0, 1))  # left, right, top, bottom
    assert p.shape == (1, 3, 6)
    assert p[0, :2, 1:4].eq(1).all() and p[0, 2].eq(10000).all()
    assert p[0, :, 0].eq(10000).all() and p[0, :, 4:].eq(10000).all()
    assert cc.pad_region_map(r, (0, 0, 0, 0)) is r


def test_paint_masks_area_ascending_larger_overwrites():
    m = torch.zeros(3, 4, 4, dtype=torch.bool)
    m[0, :3, :3] = True  # area 9
    m[1, :1, :1] = True  # area 1
    m[2, 1:, 1:] = True  # area 9, after mask 0 in a stable sort
    area = m.flatten(1).sum(1)
    out = cc.paint_masks(m, area)  # painting order 1, 0, 2 -> ids 1, 2, 3
    assert out.tolist() == [[2, 2, 2, 0], [2, 3, 3, 3], [2, 3, 3, 3], [0, 3, 3, 3]]
    out = cc.paint_masks(m, area, ids="index")  # EntitySeg: id = index + 1, same painting order
    assert out.tolist() == [[1, 1, 1, 0], [1, 3, 3, 3], [1, 3, 3, 3], [0, 3, 3, 3]]
    assert cc.paint_masks(m).tolist() == [[2, 1, 1, 0], [1, 3, 3, 3], [1, 3, 3, 3], [0, 3, 3, 3]]
    with pytest.raises(InvalidInputError, match="ids"):
        cc.paint_masks(m, ids="area")


# ------------------------------------------------------------------------------------------------ merging
def _components_by_definition(adj):
    """Connected components by breadth-first search, numbered in order of their lowest member."""
    k = adj.shape[0]
    lab = [-1] * k
    n = 0
    for s in range(k):
        if lab[s] >= 0:
            continue
        stack = [s]
        while stack:
            i = stack.pop()
            if lab[i] >= 0:
                continue
            lab[i] = n
            stack.extend(j for j in range(k) if (adj[i, j] or adj[j, i]) and lab[j] < 0)
        n += 1
    return lab


def test_connected_components_matches_definition_on_random_graphs():
    g = _gen(3)
    for k in (1, 2, 5, 9, 17):
        for p in (0.0, 0.1, 0.3, 0.8):
            a = torch.rand(k, k, generator=g) < p
            a = a | a.T
            assert cc.connected_components(a).tolist() == _components_by_definition(a)
    # a chain is one component even though its ends are far apart (transitivity)
    d = torch.tensor([[0.0, 0.15, 0.3], [0.15, 0.0, 0.15], [0.3, 0.15, 0.0]])
    assert cc.connected_components(d <= 0.2).tolist() == [0, 0, 0]
    assert cc.connected_components(torch.zeros(0, 0, dtype=torch.bool)).numel() == 0


@pytest.mark.parametrize("dist,labels", [
    # distance matrices and DBSCAN(eps=0.2, min_samples=1, metric='precomputed') labels dumped from the official
    # code (oracle windows case0/0 and case1/0)
    ([[0.0, 0.045838, 1.14113, 0.302532, 0.002921], [0.045838, 0.0, 1.344724, 0.260919, 0.063966],
      [1.14113, 1.344724, 0.0, 1.418281, 1.080081], [0.302532, 0.260919, 1.418281, 0.0, 0.336474],
      [0.002921, 0.063966, 1.080081, 0.336474, 0.0]], [0, 0, 1, 2, 0]),
    ([[0.0, 0.747357, 0.132565, 1.009496, 1.434579, 0.26635], [0.747357, 0.0, 0.97057, 0.339775, 1.025274, 0.80792],
      [0.132565, 0.97057, 0.0, 1.1962, 1.746482, 0.449955], [1.009496, 0.339775, 1.1962, 0.0, 1.036365, 0.992397],
      [1.434579, 1.025274, 1.746482, 1.036365, 0.0, 1.224186], [0.26635, 0.80792, 0.449955, 0.992397, 1.224186, 0.0]],
     [0, 1, 0, 2, 3, 4]),
])
def test_connected_components_equals_official_dbscan(dist, labels):
    assert cc.connected_components(torch.tensor(dist) <= 0.2).tolist() == labels


def _feats_for(regions, region_feats):
    """(1, M, C) unit features where every cell carries its region's feature."""
    ids = sorted(region_feats)
    table = torch.stack([F.normalize(torch.tensor(region_feats[i], dtype=torch.float32), dim=0) for i in ids])
    idx = torch.tensor([ids.index(v) for v in regions.flatten().tolist()])
    return table[idx][None]


def test_merge_regions_hand_example():
    # 2x3 grid: U = id 0 (left out even if similar), regions 4 and 7 identical -> merged, 9 distinct
    regions = torch.tensor([[[0, 4, 4], [7, 9, 0]]])
    feats = _feats_for(regions, {0: [1.0, 0, 0], 4: [1.0, 0, 0], 7: [1.0, 0.01, 0], 9: [0, 1.0, 0]})
    out = cc.merge_regions(regions, feats)
    # region order 4, 7, 9: components {4, 7} -> 0, {9} -> 1; U keeps its id
    assert out.tolist() == [[[0, 10000, 10000], [10000, 10001, 0]]]
    assert out.dtype == regions.dtype
    # eps decides: at eps=0 the nearly-equal 4 and 7 (distance ~5e-5) stay apart
    assert cc.merge_regions(regions, feats, eps=0.0).unique().tolist() == [0, 10000, 10001, 10002]


def test_merge_regions_leaves_one_or_two_ids_alone_and_batches():
    regions = torch.tensor([[[3, 3], [5, 5]]])
    feats = _feats_for(regions, {3: [1.0, 0], 5: [1.0, 0]})
    assert torch.equal(cc.merge_regions(regions, feats), regions)  # two ids: nothing to merge
    g = _gen(1)
    r = torch.randint(0, 5, (3, 4, 5), generator=g)
    f = F.normalize(torch.randn(3, 20, 6, generator=g), dim=-1)
    batched = cc.merge_regions(r, f, eps=0.9)
    for b in range(3):
        assert torch.equal(batched[b:b + 1], cc.merge_regions(r[b:b + 1], f[b:b + 1], eps=0.9))
    with pytest.raises(InvalidInputError, match="do not match"):
        cc.merge_regions(r, f[:, :10])


# ------------------------------------------------------------------------------------------------ scope
def test_vfm_qk_features_matches_dino_layout():
    g = _gen(2)
    b, n, nh, hd = 2, 5, 3, 4
    qkv = torch.randn(b, n, 3 * nh * hd, generator=g)  # the output of DINO's attn.qkv Linear
    q, k, _ = qkv.view(b, n, 3, nh, hd).permute(2, 0, 3, 1, 4)  # DINO's own per-head split
    ref = qkv.reshape(b, n, 3, -1)  # the reference: [..., 0, :] + [..., 1, :], CLS dropped, normalised
    expected = F.normalize((ref[:, :, 0] + ref[:, :, 1])[:, 1:], dim=-1)
    torch.testing.assert_close(cc.vfm_qk_features(q, k), expected, rtol=0, atol=1e-6)


def test_scope_allow_by_definition():
    regions = torch.tensor([[0, 0, 5, 5, 6]])  # U = {0, 1}
    sim = torch.tensor([[[1.0, 0.9, 0.8, 0.1, 0.1],
                         [0.9, 1.0, 0.1, 0.1, 0.1],
                         [0.8, 0.1, 1.0, 0.2, 0.9],
                         [0.1, 0.1, 0.2, 1.0, 0.1],
                         [0.1, 0.1, 0.9, 0.1, 1.0]]])
    mean = sim.mean()  # 0.428
    allow = cc.scope_allow(regions, sim)[0]
    for i, j in itertools.product(range(5), range(5)):
        u_i, u_j = regions[0, i] == 0, regions[0, j] == 0
        same = bool(regions[0, i] == regions[0, j]) and not u_i
        assert bool(allow[i, j]) == (same or (bool(u_i or u_j) and bool(sim[0, i, j] > mean))), (i, j)
    # regions 5 and 6 never mix even at similarity 0.9; U and region 5 mix where similar
    assert not allow[2, 4] and not allow[4, 2] and allow[0, 2] and allow[2, 0] and not allow[1, 2]


def test_scope_attention_mixes_only_within_regions():
    g = _gen(4)
    regions = torch.tensor([[0, 2, 2, 2, 3, 3, 3, 3, 1, 1]])  # U = id 0 (one token)
    feats = F.normalize(torch.randn(1, 10, 8, generator=g), dim=-1)
    a = cc.scope_attention(feats, regions)[0]
    torch.testing.assert_close(a.sum(-1), torch.ones(10), rtol=0, atol=1e-6)
    allow = cc.scope_allow(regions, feats @ feats.transpose(1, 2))[0]
    for i in range(1, 10):  # non-U tokens: zero weight outside their region and U
        other = (regions[0] != regions[0, i]) & (regions[0] != 0)
        assert a[i, other].abs().max() == 0
        # within the allowed set, softmax(4 * S) renormalised
        s = (feats[0, i] @ feats[0].T) * 4.0
        e = torch.exp(s - s.max()) * allow[i]
        torch.testing.assert_close(a[i], e / e.sum(), rtol=1e-5, atol=1e-7)
    # batch = one by one
    f2 = F.normalize(torch.randn(2, 10, 8, generator=g), dim=-1)
    r2 = torch.stack([regions[0], regions[0].flip(0)])
    a2 = cc.scope_attention(f2, r2)
    for b in range(2):
        torch.testing.assert_close(a2[b:b + 1], cc.scope_attention(f2[b:b + 1], r2[b:b + 1]), rtol=0, atol=1e-7)


def test_scope_attention_uniform_window_nan_like_reference_unless_keep_diagonal():
    feats = F.normalize(torch.ones(1, 4, 3), dim=-1)  # all similarities equal the mean: U rows are empty
    regions = torch.zeros(1, 4, dtype=torch.long)
    assert torch.isnan(cc.scope_attention(feats, regions)).all()
    a = cc.scope_attention(feats, regions, keep_diagonal=True)
    torch.testing.assert_close(a[0], torch.eye(4))


def test_scope_attention_temperature_and_strict_mean_hand_example():
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]]])  # unit rows
    regions = torch.tensor([[1, 1, 1, 1]])  # one region: it is U, so only the above-mean rule applies
    a = cc.scope_attention(feats, regions)[0]
    # S rows: [1, 1, .6, -1], [1, 1, .6, -1], [.6, .6, 1, -.6], [-1, -1, -.6, 1]; mean(S) = 0.2
    torch.testing.assert_close(a[0], torch.cat([torch.softmax(torch.tensor([4.0, 4.0, 2.4]), 0), torch.zeros(1)]))
    torch.testing.assert_close(a[3], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    a2 = cc.scope_attention(feats, regions, temperature=1.0)[0]
    torch.testing.assert_close(a2[0, :3], torch.softmax(torch.tensor([1.0, 1.0, 0.6]), 0))


# ------------------------------------------------------------------------------------------------ branches
def test_spatial_block_indices():
    assert cc.spatial_block_indices(12) == [5, 6, 7, 8, 9]
    assert cc.spatial_block_indices(24) == list(range(10, 22))
    assert cc.spatial_block_indices(32) == list(range(2, 30))
    assert cc.spatial_block_indices(6) == [2, 3]
    with pytest.raises(InvalidInputError, match="at least 5"):
        cc.spatial_block_indices(4)
    outs = [torch.full((1, 2, 3), float(i)) for i in range(4)]
    assert cc.mean_block_outputs(outs).eq(1.5).all()
    with pytest.raises(InvalidInputError):
        cc.mean_block_outputs([])


def test_region_token_allow_pattern():
    tok = torch.tensor([[[5, 5], [2, 9]], [[1, 1], [1, 1]]])  # window 0: 3 regions, window 1: 1
    allow, valid, index = cc.region_token_allow(tok)
    assert allow.shape == (2, 3, 5) and valid.tolist() == [[True, True, True], [True, False, False]]
    assert index.tolist() == [[[1, 1], [0, 2]], [[0, 0], [0, 0]]]
    # row k: CLS + the patches of the k-th smallest id
    assert allow[0].tolist() == [[True, False, False, True, False],
                                 [True, True, True, False, False],
                                 [True, False, False, False, True]]
    assert allow[1].tolist() == [[True] * 5, [True] + [False] * 4, [True] + [False] * 4]


def test_scatter_region_tokens_nearest():
    tokens = torch.arange(6.0).view(1, 3, 2)  # 3 regions, D = 2
    index = torch.tensor([[[0, 2], [1, 1]]])  # CLIP grid 2x2
    out = cc.scatter_region_tokens(tokens, index, (4, 4))  # each CLIP patch covers 2x2 VFM cells
    rows = out[0, :, 0].view(4, 4) / 2
    assert rows.tolist() == [[0, 0, 2, 2], [0, 0, 2, 2], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_fuse_branches_weights():
    ln = torch.nn.LayerNorm(4, elementwise_affine=False)
    g = _gen(5)
    a, b, c = (torch.randn(1, 3, 4, generator=g) for _ in range(3))
    proj = torch.randn(4, 2, generator=g)
    out = cc.fuse_branches(a, b, c, ln_post=ln, proj=proj)
    torch.testing.assert_close(out, (ln(a) + ln(b) + 0.5 * ln(c)) @ proj)
    out = cc.fuse_branches(a, b, c, ln_post=ln, proj=None, alpha=0.0, beta=0.0)
    torch.testing.assert_close(out, ln(a))


# ------------------------------------------------------------------------------------------------ post-processing
def test_merge_first_class_synonyms():
    p = torch.tensor([0.1, 0.3, 0.2, 0.4])  # 3 queries of class 0, then class 1
    assert cc.merge_first_class_synonyms(p, 2).tolist() == pytest.approx([0.3, 0.4])
    assert cc.merge_first_class_synonyms(p, 4) is p
    with pytest.raises(InvalidInputError):
        cc.merge_first_class_synonyms(p, 5)
    # equal to ovseg's general per-class maximum when only class 0 has synonyms, listed first
    g = _gen(6)
    logits = torch.randn(5, 3, 4, generator=g)
    query_class = [0, 0, 0, 1, 2]
    labels, scores = postprocess(logits, query_class, 3, logit_scale=40.0)
    mine = cc.merge_first_class_synonyms(torch.softmax(logits * 40.0, 0), 3)
    torch.testing.assert_close(mine, scores)


def _vote_by_definition(pred, regions):
    out = pred.clone()
    ids = torch.unique(regions)
    for v in ids[1:]:
        m = regions == v
        out[m] = torch.mode(pred[m])[0]
    return out


def test_region_vote_hand_example_and_ties():
    regions = torch.tensor([[0, 0, 4, 4], [7, 7, 7, 4]])
    pred = torch.tensor([[3, 1, 2, 2], [5, 1, 5, 0]])
    # U (id 0) keeps 3, 1; region 4 -> 2 (2 votes of 3); region 7 -> 5
    assert cc.region_vote(pred, regions).tolist() == [[3, 1, 2, 2], [5, 5, 5, 2]]
    # a tie goes to the smallest label, like torch.mode
    assert cc.region_vote(torch.tensor([[0, 6, 2, 6, 2]]), torch.tensor([[0, 1, 1, 1, 1]])).tolist() == \
        [[0, 2, 2, 2, 2]]


def test_region_vote_equals_torch_mode_and_batches():
    g = _gen(7)
    for _ in range(20):
        regions = torch.randint(-2, 6, (7, 9), generator=g)
        pred = torch.randint(0, 4, (7, 9), generator=g)
        assert torch.equal(cc.region_vote(pred, regions), _vote_by_definition(pred, regions))
    r = torch.randint(0, 4, (3, 5, 5), generator=g)
    p = torch.randint(0, 3, (3, 5, 5), generator=g)
    assert torch.equal(cc.region_vote(p, r), torch.stack([cc.region_vote(p[i], r[i]) for i in range(3)]))
    with pytest.raises(InvalidInputError, match="one shape"):
        cc.region_vote(p, r[:2])


def test_region_vote_in_bands_equals_one_pass():
    """The banded vote (two passes over rows, O(band) temporaries) is the whole-map vote, whatever the band
    height, including regions that span bands and a smallest id present in only some bands."""
    g = _gen(11)
    for rows_px in (9, 18, 40, 1000):  # 1, 2, 4 rows of a width-9 map, and a single band
        for _ in range(10):
            regions = torch.randint(3, 9, (13, 9), generator=g).int()
            regions[0, 0] = 2  # the smallest id (U) appears in the first band only
            pred = torch.randint(0, 5, (13, 9), generator=g)
            want = _vote_by_definition(pred, regions.long())
            assert torch.equal(cc.region_vote(pred, regions, band_pixels=rows_px), want)
