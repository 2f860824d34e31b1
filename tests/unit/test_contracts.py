"""Contracts every registered strategy must keep: shapes, attention rows summing to what it declares, only the
declared projections read, declared parameters with valid defaults, a batch equal to one-by-one."""
import pytest
import torch

from ovseg.attention import get_attention, list_attentions
from ovseg.methods import get_method, list_methods
from ovseg.params import Param
from ovseg.strategies import get_strategy, list_strategies

B, NH, HD, GRID, VFM_GRID = 2, 3, 8, (3, 4), (5, 6)


def _inputs(strategy, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 1 + GRID[0] * GRID[1]
    qkv = {name: torch.randn(B, NH, n, HD, generator=g, dtype=torch.float64) if name in strategy.needs else None
           for name in "qkv"}
    vfm = torch.randn(B, 16, *VFM_GRID, generator=g, dtype=torch.float64) if strategy.uses_vfm else None
    params = {p.name: p.default for p in strategy.params}
    return qkv, vfm, params


@pytest.mark.parametrize("name", list_attentions())
def test_attention_contract(name):
    s = get_attention(name)
    assert s.needs <= {"q", "k", "v"} and "v" in s.needs
    assert all(isinstance(p, Param) and p.validate(p.default) == p.default for p in s.params)
    qkv, vfm, params = _inputs(s)
    # undeclared projections are passed as None: a strategy that read one would fail here
    out = s.fn(qkv["q"], qkv["k"], qkv["v"], scale=HD ** -0.5, grid=GRID, vfm_feats=vfm, **params)
    n_out = 1 + GRID[0] * GRID[1] if s.keeps_cls else VFM_GRID[0] * VFM_GRID[1]
    assert out.shape == (B, NH, n_out, HD) and out.dtype == torch.float64 and torch.isfinite(out).all()
    # with v = 1 every output is the row sum of the attention weights
    if s.row_sum is not None:
        ones = torch.ones_like(qkv["v"])
        summed = s.fn(qkv["q"], qkv["k"], ones, scale=HD ** -0.5, grid=GRID, vfm_feats=vfm, **params)
        torch.testing.assert_close(summed, torch.full_like(summed, s.row_sum))
    # batch = one-by-one
    for i in range(B):
        one = {k: None if v is None else v[i:i + 1] for k, v in qkv.items()}
        single = s.fn(one["q"], one["k"], one["v"], scale=HD ** -0.5, grid=GRID,
                      vfm_feats=None if vfm is None else vfm[i:i + 1], **params)
        torch.testing.assert_close(single[0], out[i])


@pytest.mark.parametrize("name", list_strategies())
def test_dense_strategy_declarations(name):
    cls = get_strategy(name)
    assert cls.name == name and cls.doc
    for method in list_methods():
        cfg = get_method(method)
        if cfg.strategy != name:
            continue
        opts = cfg.strategy_options
        params = cls.declared_params(opts)
        assert set(opts) == {p.name for p in params}  # every declared option resolved, nothing else
        assert all(p.validate(p.default) == p.default for p in params if p.default is not None)
        assert set(cfg.vfms) <= set(cls.vfm_roles(opts))
