"""Each attention strategy against a hand-computed example of its equation."""
import math

import pytest
import torch

from ovseg.attention import (
    gaussian_kk_attention,
    gaussian_kk_weights,
    gaussian_window,
    get_attention,
    kk_attention,
    list_attentions,
    maskclip_attention,
    proxy_attention,
    proxy_weights,
    qq_attention,
    qq_kk_attention,
    qq_kk_weights,
    resize_values,
    self_weights,
    vanilla_attention,
    vanilla_weights,
)


def _qkv(b=2, nh=3, n=5, hd=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, nh, n, hd, generator=g, dtype=dtype) for _ in range(3)]


def _softmax_rows(m):
    e = torch.exp(m - m.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def test_vanilla_hand_example():
    # one head, two tokens, hd=1: logits q_i k_j / sqrt(1)
    q = torch.tensor([[[[1.0], [2.0]]]])
    k = torch.tensor([[[[1.0], [-1.0]]]])
    v = torch.tensor([[[[10.0], [20.0]]]])
    w = vanilla_weights(q, k)
    expected = torch.tensor([[1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))],
                             [1 / (1 + math.exp(-4)), math.exp(-4) / (1 + math.exp(-4))]])
    torch.testing.assert_close(w[0, 0], expected)
    torch.testing.assert_close(vanilla_attention(q, k, v), w @ v)


def test_vanilla_matches_explicit_softmax():
    q, k, v = _qkv()
    w = _softmax_rows(q @ k.transpose(-2, -1) / 2.0)
    torch.testing.assert_close(vanilla_attention(q, k, v), w @ v)
    torch.testing.assert_close(vanilla_weights(q, k).sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))


def test_maskclip_is_identity_attention():
    q, k, v = _qkv()
    assert maskclip_attention(None, None, v) is v


def test_self_self_strategies():
    q, k, v = _qkv()
    wq = _softmax_rows(q @ q.transpose(-2, -1) / 2.0)
    wk = _softmax_rows(k @ k.transpose(-2, -1) / 2.0)
    torch.testing.assert_close(qq_attention(q, None, v), wq @ v)
    torch.testing.assert_close(kk_attention(None, k, v), wk @ v)
    torch.testing.assert_close(qq_kk_attention(q, k, v), (wq + wk) @ v)
    torch.testing.assert_close(qq_kk_weights(q, k), wq + wk)
    # rows: 1 for q-q and k-k, 2 for SCLIP's sum; q-q logits symmetric
    torch.testing.assert_close(self_weights(q).sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    torch.testing.assert_close(qq_kk_weights(q, k).sum(-1), 2 * torch.ones(2, 3, 5, dtype=torch.float64))


def test_gaussian_window_values_and_cls():
    omega = gaussian_window((14, 14), 5.0)
    assert omega.shape == (197, 197)
    assert torch.all(omega[0] == 0) and torch.all(omega[:, 0] == 0)
    p = lambda i, j: 1 + i * 14 + j  # noqa: E731  token index of patch (i, j)
    assert omega[p(3, 3), p(3, 3)] == 1.0
    assert round(float(omega[p(3, 3), p(3, 4)]), 3) == 0.980  # distance 1
    assert round(float(omega[p(3, 3), p(4, 4)]), 3) == 0.961  # distance sqrt(2)
    assert round(float(omega[p(3, 3), p(8, 3)]), 3) == 0.607  # distance 5
    assert abs(float(omega[p(0, 0), p(13, 13)]) - 0.00116) < 1e-5  # distance 13*sqrt(2)
    torch.testing.assert_close(omega, omega.T)


def test_gaussian_window_non_square_and_cached():
    a = gaussian_window((3, 5), 2.0, with_cls=False)
    # (0,0) vs (2,4): d^2 = 4 + 16
    assert abs(float(a[0, 2 * 5 + 4]) - math.exp(-20 / 8)) < 1e-7
    assert gaussian_window((3, 5), 2.0, with_cls=False) is a


def test_gaussian_kk_equation():
    b, nh, gh, gw, hd = 1, 2, 3, 4, 8
    g = torch.Generator().manual_seed(0)
    k = torch.randn(b, nh, 1 + gh * gw, hd, generator=g)
    v = torch.randn(b, nh, 1 + gh * gw, hd, generator=g)
    omega = gaussian_window((gh, gw), 5.0)
    w = _softmax_rows(k @ k.transpose(-2, -1) / math.sqrt(hd) + omega)
    torch.testing.assert_close(gaussian_kk_weights(k, grid=(gh, gw)), w)
    torch.testing.assert_close(gaussian_kk_attention(None, k, v, grid=(gh, gw)), w @ v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(b, nh, 1 + gh * gw))


def test_proxy_hand_example():
    # three tokens in a 1x3 grid; features: t0, t1 identical, t2 orthogonal
    feats = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).view(1, 2, 1, 3)
    s = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1.0]])
    mu = s.mean()
    a = 3.0 * (s - 1.2 * mu)
    a[a < 0] = float("-inf")
    expected = torch.softmax(a, dim=-1)
    w = proxy_weights(feats)
    torch.testing.assert_close(w[0], expected)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 3))
    assert w[0, 0, 2] == 0 and w[0, 2, 0] == 0


def test_proxy_one_hot_regions_average_their_own_values():
    """VFM features = one-hot region ids: each output token is the mean of the values of its region."""
    gh, gw, nh, hd = 6, 8, 2, 4
    region = torch.zeros(gh, gw, dtype=torch.long)
    region[:, 3:] = 1
    region[4:, 5:] = 2
    feats = torch.nn.functional.one_hot(region, 3).permute(2, 0, 1).float()[None]  # (1, 3, gh, gw)
    v = torch.randn(1, nh, 1 + gh * gw, hd)
    out = proxy_attention(None, None, v, grid=(gh, gw), vfm_feats=feats)
    assert out.shape == (1, nh, gh * gw, hd)
    flat = region.flatten()
    for r in range(3):
        mean_r = v[:, :, 1:][:, :, flat == r].mean(dim=2)  # (1, nh, hd)
        torch.testing.assert_close(out[:, :, flat == r], mean_r[:, :, None].expand(-1, -1, int((flat == r).sum()), -1))


def test_proxy_mean_is_per_window():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 16, 4, 4, generator=g)
    b = torch.randn(1, 16, 4, 4, generator=g) + 3.0  # a very different window
    both = proxy_weights(torch.cat([a, b]))
    torch.testing.assert_close(both[0:1], proxy_weights(a))
    torch.testing.assert_close(both[1:2], proxy_weights(b))


def test_proxy_uniform_window_no_nan_keeps_diagonal():
    feats = torch.ones(1, 8, 3, 3)
    feats[0, 0, 0, 0] = 1.001  # nearly uniform: mean cosine ~1 > 1/beta, every entry below beta*mu
    w = proxy_weights(feats)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[0], torch.eye(9))
    ref = proxy_weights(feats, keep_diagonal=False)  # the reference: NaN rows (docs/methods.md quirks)
    assert torch.isnan(ref).all()


def test_proxy_keep_diagonal_changes_only_fully_masked_rows():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 32, 5, 7, generator=g)
    torch.testing.assert_close(proxy_weights(feats, keep_diagonal=True), proxy_weights(feats, keep_diagonal=False))


def test_proxy_non_square_values_resized_to_vfm_grid():
    # CLIP grid 3x5, VFM grid 6x10 (non-square): values resized bilinearly, in (row, col) order
    gh, gw = 3, 5
    val = torch.arange(gh * gw, dtype=torch.float32).view(gh, gw)
    v = torch.cat([torch.full((1,), -1.0), val.flatten()]).view(1, 1, 1 + gh * gw, 1)
    out = resize_values(v, (gh, gw), (6, 10))
    expected = torch.nn.functional.interpolate(val[None, None], size=(6, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.view(6, 10), expected[0, 0])
    # identity feats (every token its own region) -> proxy output equals the resized values
    feats = torch.eye(60).view(60, 6, 10)[None]
    res = proxy_attention(None, None, v, grid=(gh, gw), vfm_feats=feats)
    torch.testing.assert_close(res.view(6, 10), expected[0, 0])


def test_registry_lists_all_strategies():
    assert set(list_attentions()) >= {"vanilla", "maskclip", "qq", "kk", "qq_kk", "gaussian_kk", "proxy"}
    assert get_attention("proxy").needs == frozenset("v")
    with pytest.raises(ValueError, match="did you mean 'qq_kk'"):
        get_attention("qq_kkk")
