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


class _Op(nn.Module):
    """One op of the forward, as a module (count_flops takes a module and an input shape)."""

    def __init__(self, fn, *modules):
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(modules)

    def forward(self, x):
        return self.fn(x, *self.mods)


# (name, module, input shape, category, MACs by fvcore's conventions, counted by FlopCounterMode)
CASES = [
    ("conv transposed", _Op(lambda x, c: c(x), nn.ConvTranspose2d(4, 6, 3, stride=2)),
     (1, 4, 5, 7), "conv", 4 * 6 * 3 * 3 * 5 * 7, True),  # Cin x Cout x k^2 x input pixels
    ("bmm", _Op(lambda x: torch.bmm(x[0], x[0, :, :, :2].expand(3, 4, 2)[:, :1].expand(3, 5, 2))),
     (1, 3, 4, 5), "matmul", 3 * 4 * 5 * 2, True),
    ("baddbmm", _Op(lambda x: torch.baddbmm(torch.zeros(3, 4, 2, device=x.device), x[0],
                                            x[0, :, :1, :2].expand(3, 5, 2))),
     (1, 3, 4, 5), "matmul", 3 * 4 * 5 * 2, True),
    ("addmm", _Op(lambda x, l: l(x.flatten(0, 2)), nn.Linear(5, 7)), (1, 3, 4, 5), "matmul",
     12 * 5 * 7, True),
    ("mm", _Op(lambda x: x[0, 0] @ x[0, 0, :, :3]), (1, 1, 5, 5), "matmul", 5 * 5 * 3, True),
    ("strided conv", _Op(lambda x, c: c(x), nn.Conv2d(4, 8, 3, stride=2)), (1, 4, 11, 13),
     "conv", 8 * 5 * 6 * 4 * 9, True),  # output pixels, not input pixels
    ("layer norm, weight without bias", _Op(lambda x, n: n(x), nn.LayerNorm(5, bias=False)),
     (1, 3, 4, 5), "norm", 60 * 5, False),
    ("group norm, weight without bias",
     _Op(lambda x: F.group_norm(x, 2, weight=torch.ones(4, device=x.device))), (1, 4, 3, 3),
     "norm", 36 * 5, False),
    ("batch norm, weight without bias",
     _Op(lambda x: F.batch_norm(x, torch.zeros(4, device=x.device), torch.ones(4, device=x.device),
                                weight=torch.ones(4, device=x.device))), (1, 4, 3, 3),
     "norm", 36 * 5, False),
    ("layer norm, no affine", _Op(lambda x, n: n(x), nn.LayerNorm(5, elementwise_affine=False)),
     (1, 3, 4, 5), "norm", 60 * 4, False),
    ("group norm", _Op(lambda x, n: n(x), nn.GroupNorm(2, 4)), (1, 4, 3, 3), "norm", 36 * 5,
     False),
    ("group norm, no affine", _Op(lambda x, n: n(x), nn.GroupNorm(2, 4, affine=False)),
     (1, 4, 3, 3), "norm", 36 * 4, False),
    ("batch norm (eval)", _Op(lambda x, n: n(x), nn.BatchNorm2d(4)), (1, 4, 3, 3), "norm",
     36 * 5, False),
    ("nearest upsampling", _Op(lambda x: F.interpolate(x, scale_factor=2, mode="nearest")),
     (1, 2, 3, 3), "upsample", 2 * 6 * 6, False),
    ("adaptive average pooling", _Op(lambda x, p: p(x), nn.AdaptiveAvgPool2d(2)), (1, 4, 4, 6),
     "pool", 96, False),  # to 1x1 it would dispatch as aten::mean (not counted by fvcore)
]


@pytest.mark.parametrize("name, model, shape, category, macs, torch_counts", CASES,
                         ids=[c[0] for c in CASES])
def test_every_handle_against_its_formula(name, model, shape, category, macs, torch_counts):
    fc = count_flops(model, shape)
    assert fc.by_category_gmacs == {category: macs / 1e9}
    assert fc.gmacs * 1e9 == pytest.approx(macs, abs=1e-6)
    assert fc.gflops == 2 * fc.gmacs
    assert fc.gflops_torch * 1e9 == pytest.approx(2 * macs if torch_counts else 0, abs=1e-6)
    assert fc.fvcore_only_gmacs * 1e9 == pytest.approx(0 if torch_counts else macs, abs=1e-6)


class _KeywordSdpa(nn.Module):
    """SDPA called with keyword tensors, 3-D (no head axis), Lq != Lk, then a conv: the
    attention is counted once and whole, and counting resumes after it."""

    def __init__(self, style):
        super().__init__()
        self.style = style
        self.c = nn.Conv2d(1, 1, 1)

    def forward(self, x):  # x: (1, 1, 10, 8)
        q, kv = x[0, :, :4], x[0]  # (1, 4, 8) and (1, 10, 8)
        if self.style == "query positional":
            out = F.scaled_dot_product_attention(q, key=kv, value=kv[..., :6])
        else:
            out = F.scaled_dot_product_attention(query=q, key=kv, value=kv[..., :6])
        return self.c(out[None])


@pytest.mark.parametrize("style", ["query positional", "all keywords"])
def test_sdpa_with_keyword_arguments_then_more_ops(style):
    fc = count_flops(_KeywordSdpa(style), (1, 1, 10, 8))
    sdpa = 1 * 4 * 10 * (8 + 6)  # B x Lq x Lk x (E + Ev)
    conv = 4 * 6  # 1x1 conv over the (1, 1, 4, 6) output
    assert fc.by_category_gmacs["sdpa"] * 1e9 == sdpa
    assert fc.by_category_gmacs["conv"] * 1e9 == conv
    assert fc.gflops_torch * 1e9 == 2 * (sdpa + conv)
    assert "aten::_softmax" not in fc.unsupported_ops and "aten::bmm" not in fc.unsupported_ops


def test_batch_is_forced_to_one_and_row_fields():
    fc = count_flops(Conv(), (4, 4, 10, 12))  # batch 4 asked: counted for one image
    macs = 8 * 10 * 12 * 4 * 9
    assert fc.gmacs * 1e9 == macs
    row = fc.as_row()
    assert row == {"gflops": 2 * macs / 1e9, "gmacs": macs / 1e9, "gflops_torch": 2 * macs / 1e9,
                   "flops_by_op_gmacs": {"conv": macs / 1e9}, "unsupported_ops": {},
                   "flops_convention": "1 MAC = 2 FLOPs; forward, batch 1; meta tensors"}


def test_counting_prints_nothing(capsys):
    count_flops(Conv(), (1, 4, 10, 12))
    assert capsys.readouterr().out == ""


def test_repeated_ops_add_up():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.b(self.a(x))
            y = F.scaled_dot_product_attention(y, y, y) + F.scaled_dot_product_attention(y, y, y)
            return F.gelu(y) * y * y

    fc = count_flops(Twice(), (1, 4, 6, 8))
    conv = 8 * 6 * 8 * 4 * 9 + 4 * 6 * 8 * 8
    sdpa = 2 * (4 * 6 * 6 * (8 + 8))  # two calls: batch 1 x 4 "heads" x Lq=Lk=6 x (E + Ev)
    assert fc.by_category_gmacs == {"conv": conv / 1e9, "sdpa": sdpa / 1e9}
    assert fc.unsupported_ops["aten::mul"] == 2 and fc.unsupported_ops["aten::add"] == 1


def test_sdpa_with_a_positional_mask():
    class M(nn.Module):
        def forward(self, x):  # (1, 2, 5, 4)
            return F.scaled_dot_product_attention(x, x, x, torch.zeros(5, 5, device=x.device))

    fc = count_flops(M(), (1, 2, 5, 4))
    assert fc.by_category_gmacs["sdpa"] * 1e9 == 2 * 5 * 5 * (4 + 4)
