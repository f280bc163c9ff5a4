"""Important-token selection against the naive full-attention reference (paper Sec. 3.5)."""
import pytest
import torch

from fpt.extract import num_selected, select_important_tokens, token_importance
from tests.helpers import assert_is_topk, naive_importance


@pytest.mark.parametrize("mode", ["global", "cls"])
@pytest.mark.parametrize("n_tokens", [17, 65, 130])
def test_importance_matches_naive_reference(mode, n_tokens):
    g = torch.Generator().manual_seed(n_tokens)
    q, k = (torch.randn(2, 3, n_tokens, 8, generator=g) for _ in range(2))
    ours = token_importance(q, k, 8 ** -0.5, mode, query_block=16)
    torch.testing.assert_close(ours.double(), naive_importance(q, k, 8 ** -0.5, mode), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("block", [1, 3, 16, 64, 1000])
def test_importance_independent_of_query_block(block):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 97, 16, generator=g) for _ in range(2))
    reference = token_importance(q, k, 0.25, "global", query_block=97)
    torch.testing.assert_close(token_importance(q, k, 0.25, "global", query_block=block), reference,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["global", "cls"])
def test_selection_is_naive_topk_per_head(mode):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 50, 8, generator=g) for _ in range(3))
    idx, ks, vs = select_important_tokens(q, k, v, 8 ** -0.5, 0.2, mode, query_block=7)
    assert idx.shape == (2, 4, 10) and ks.shape == vs.shape == (2, 4, 10, 8)
    assert_is_topk(idx, naive_importance(q, k, 8 ** -0.5, mode), 10)
    for b in range(2):
        for h in range(4):
            assert torch.equal(ks[b, h], k[b, h, idx[b, h]])
            assert torch.equal(vs[b, h], v[b, h, idx[b, h]])


def test_num_selected_is_floor_of_ratio():
    assert num_selected(1025, 0.2) == 205       # ViT-B/16 at 512
    assert num_selected(16385, 0.2) == 3277     # at 2048
    assert num_selected(10, 0.01) == 1
    assert num_selected(10, 1.0) == 10


def test_num_selected_rounds_down_whatever_the_fraction():
    """k = floor(N * ratio) for every ratio, also where N * ratio is nearer the next integer (rounding to nearest
    would keep one token more there, so a store's k would depend on how the fraction falls); the reference is exact
    rational arithmetic."""
    from fractions import Fraction

    nearer_up = 0
    for n in (65, 197, 577, 1025):                    # class token + 8^2, 14^2, 24^2, 32^2 patches
        for ratio in ("0.1", "0.15", "0.2", "0.3", "0.4", "0.45", "0.7", "0.9"):
            exact = Fraction(n) * Fraction(ratio)
            assert num_selected(n, float(ratio)) == max(1, exact.numerator // exact.denominator), (n, ratio)
            nearer_up += exact - exact.numerator // exact.denominator > Fraction(1, 2)
    assert nearer_up > 0                              # the cases that tell floor from rounding are among them


def test_attention_never_materialised_for_all_queries(monkeypatch):
    """The largest softmax input is [B, H, block, N], never [B, H, N, N]."""
    sizes = []
    real_softmax = torch.softmax
    monkeypatch.setattr(torch, "softmax", lambda x, dim: sizes.append(x.shape) or real_softmax(x, dim=dim))
    n, block = 600, 32
    q, k = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    token_importance(q, k, 1.0, "global", query_block=block)
    assert sizes and max(s.numel() for s in sizes) == 2 * block * n


def test_cpu_blocks_shrink_to_the_tile_budget(monkeypatch):
    """On CPU a block holds at most CPU_TILE_ELEMENTS scores (cache-sized tiles), never more than query_block."""
    from fpt.extract import selection

    sizes = []
    real_softmax = torch.softmax
    monkeypatch.setattr(torch, "softmax", lambda x, dim: sizes.append(x.shape) or real_softmax(x, dim=dim))
    monkeypatch.setattr(selection, "CPU_TILE_ELEMENTS", 2 * 2 * 100 * 20)
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 2, 100, 8, generator=g) for _ in range(2))
    ours = token_importance(q, k, 0.3, "global", query_block=256)
    assert max(s[-2] for s in sizes) == 20
    torch.testing.assert_close(ours.double(), naive_importance(q, k, 0.3, "global"), rtol=1e-5, atol=1e-7)
    sizes.clear()
    token_importance(q, k, 0.3, "global", query_block=12)
    assert max(s[-2] for s in sizes) == 12
