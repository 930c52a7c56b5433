"""FLOP handles against hand formulas, and the two counters against each other."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.measure.flops import count_flops


class Conv(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.c = nn.Conv2d(4, 8, 3, padding=1, groups=groups)

    def forward(self, x):
        return self.c(x)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(5, 7)

    def forward(self, x):  # (1, 3, 4, 5) -> tokens of 5 features
        return self.l(x)


class Attention(nn.Module):
    def __init__(self, masked: bool):
        super().__init__()
        self.masked = masked

    def forward(self, x):  # x: (1, 3, L, E): batch 1, 3 heads
        mask = torch.zeros(x.shape[-2], x.shape[-2], device=x.device) if self.masked else None
        return F.scaled_dot_product_attention(x, x, x[..., :6], attn_mask=mask)


def test_conv_matches_formula():
    # output elements x (Cin/groups x k x k) MACs
    for groups in (1, 2, 4):
        fc = count_flops(Conv(groups), (1, 4, 10, 12))
        macs = 1 * 8 * 10 * 12 * (4 // groups) * 3 * 3
        assert fc.gmacs * 1e9 == macs
        assert fc.gflops * 1e9 == 2 * macs
        assert fc.gflops_torch * 1e9 == 2 * macs


def test_linear_matches_formula():
    fc = count_flops(Linear(), (1, 3, 4, 5))
    macs = 3 * 4 * 5 * 7
    assert fc.gmacs * 1e9 == macs
    assert fc.gflops_torch * 1e9 == 2 * macs


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_matches_formula(masked):
    L, E, Ev, H = 16, 8, 6, 3
    fc = count_flops(Attention(masked), (1, H, L, E))
    macs = H * L * L * (E + Ev)  # QK^T + attention @ V; mask add and softmax are elementwise
    assert fc.by_category_gmacs["sdpa"] * 1e9 == macs
    assert fc.gmacs * 1e9 == macs
    assert fc.gflops_torch * 1e9 == 2 * macs
    assert "aten::_softmax" not in fc.unsupported_ops  # seen whole, not decomposed


def test_selective_scan_formula():
    from serpent.scan import selective_scan

    b, d, l, n = 1, 6, 10, 4

    class Scan(nn.Module):
        def __init__(self, with_D, with_z):
            super().__init__()
            self.A = nn.Parameter(-torch.rand(d, n))
            self.D = nn.Parameter(torch.ones(d)) if with_D else None
            self.with_z = with_z

        def forward(self, x):  # x: (1, 1, d, l)
            u = x[0]
            B = u[:, :n]
            return selective_scan(u, u, self.A, B, B, D=self.D, z=u if self.with_z else None)

    for with_D in (False, True):
        for with_z in (False, True):
            fc = count_flops(Scan(with_D, with_z), (1, 1, d, l))
            macs = 9 * b * l * d * n + b * d * l * with_D + b * d * l * with_z
            assert fc.by_category_gmacs["selective_scan"] * 1e9 == macs
            assert fc.gflops_torch * 1e9 == 2 * macs


def test_unhandled_ops_are_listed_not_dropped():
    class Act(nn.Module):
        def forward(self, x):
            return F.gelu(x) * x

    fc = count_flops(Act(), (1, 3, 8, 8))
    assert fc.gmacs == 0
    assert fc.unsupported_ops.get("aten::gelu") == 1
    assert fc.unsupported_ops.get("aten::mul") == 1


def test_norms_and_upsampling_are_the_listed_fvcore_only_difference():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.n = nn.LayerNorm(4)

        def forward(self, x):
            y = self.c(x)
            y = self.n(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return F.interpolate(y, scale_factor=2, mode="bilinear")

    fc = count_flops(M(), (1, 3, 8, 8))
    conv = 4 * 8 * 8 * 3
    norm = 4 * 8 * 8 * 5
    up = 4 * 16 * 16 * 4
    assert fc.gmacs * 1e9 == conv + norm + up
    assert fc.fvcore_only_gmacs * 1e9 == norm + up
    assert fc.gflops_torch * 1e9 == 2 * conv
