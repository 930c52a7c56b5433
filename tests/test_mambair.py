"""MambaIR: official parameter counts and names, the 4-direction scan vs a plain loop, shapes."""
import pytest
import torch
import torch.nn.functional as F

import baselines.mambair as mambair_mod
from baselines.mambair import SS2D, MambaIR
from bench.registry import create_model, model_info

TINY = dict(embed_dim=30, depths=(1, 1), d_state=4)  # CAB squeezes by 30: 30 is the smallest dim


def meta_model(**kw):
    with torch.device("meta"):
        return create_model("mambair", **kw)


@pytest.mark.parametrize("task,scale,expected", [
    ("sr", 2, 20_421_863),  # classical SR x2
    ("sr", 3, 20_606_503),
    ("sr", 4, 20_569_575),
    ("sr", 8, 20_717_287),  # same network, three x2 PixelShuffle stages (no official weights)
    ("denoise", 1, 15_777_507),  # color denoising, mlp_ratio 1.2
    ("deblur", 1, 15_777_507),  # no official deblur model: the x1 (color denoising) network
])
def test_param_counts(task, scale, expected):
    assert sum(p.numel() for p in meta_model(task=task, scale=scale).parameters()) == expected


def test_registry_entry():
    info = model_info("mambair")
    assert (info.family, info.multiple, info.upsampler) == ("ssm", 1, True)
    assert set(info.tasks) == {"deblur", "denoise", "sr"}
    assert "csguoh/MambaIR" in info.reference


def test_official_key_names_and_shapes():
    sd = meta_model(task="sr", scale=4).state_dict()
    blk = "layers.5.residual_group.blocks.5."
    expected = {
        "conv_first.weight": (180, 3, 3, 3),
        "patch_embed.norm.weight": (180,),
        blk + "skip_scale": (180,),
        blk + "self_attention.in_proj.weight": (720, 180),
        blk + "self_attention.conv2d.weight": (360, 1, 3, 3),
        blk + "self_attention.x_proj_weight": (4, 12 + 2 * 16, 360),  # dt_rank ceil(180/16) = 12
        blk + "self_attention.dt_projs_weight": (4, 360, 12),
        blk + "self_attention.dt_projs_bias": (4, 360),
        blk + "self_attention.A_logs": (4 * 360, 16),
        blk + "self_attention.Ds": (4 * 360,),
        blk + "self_attention.out_norm.weight": (360,),
        blk + "self_attention.out_proj.weight": (180, 360),
        blk + "conv_blk.cab.0.weight": (60, 180, 3, 3),
        blk + "conv_blk.cab.3.attention.1.weight": (6, 180, 1, 1),
        "layers.5.conv.weight": (180, 180, 3, 3),
        "norm.weight": (180,),
        "conv_after_body.weight": (180, 180, 3, 3),
        "conv_before_upsample.0.weight": (64, 180, 3, 3),
        "upsample.0.weight": (256, 64, 3, 3),
        "upsample.2.weight": (256, 64, 3, 3),
        "conv_last.weight": (3, 64, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "mean" not in sd and blk + "self_attention.in_proj.bias" not in sd
    dn = meta_model(task="denoise", scale=1).state_dict()
    assert tuple(dn[blk + "self_attention.x_proj_weight"].shape) == (4, 44, 216)  # int(1.2 * 180)
    assert tuple(dn["conv_last.weight"].shape) == (3, 180, 3, 3)
    assert not any(k.startswith(("upsample", "conv_before_upsample")) for k in dn)


def _loop_cross_scan(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: S6 as a plain recurrence along each of the 4 pixel orders."""
    b, d, h, w = x.shape
    rows = [(i, j) for i in range(h) for j in range(w)]
    cols = [(i, j) for j in range(w) for i in range(h)]
    A = -torch.exp(m.A_logs).view(4, d, -1)
    D = m.Ds.view(4, d)
    out = torch.zeros_like(x)
    for k, order in enumerate([rows, cols, rows[::-1], cols[::-1]]):
        hidden = x.new_zeros(b, d, m.d_state)
        for i, j in order:
            u = x[:, :, i, j]  # (b, d)
            dt_low, Bt, Ct = (u @ m.x_proj_weight[k].T).split([m.dt_rank, m.d_state, m.d_state], -1)
            delta = F.softplus(dt_low @ m.dt_projs_weight[k].T + m.dt_projs_bias[k])  # (b, d)
            hidden = (torch.exp(delta[..., None] * A[k]) * hidden
                      + delta[..., None] * Bt[:, None, :] * u[..., None])
            out[:, :, i, j] += (hidden * Ct[:, None, :]).sum(-1) + D[k] * u
    return out.flatten(2)


@pytest.mark.parametrize("size", [(3, 5), (4, 4)])
def test_cross_scan_matches_plain_loop(size):
    torch.manual_seed(0)
    m = SS2D(d_model=8, d_state=4).double()
    with torch.no_grad():
        m.A_logs.add_(0.3 * torch.randn_like(m.A_logs))
        m.Ds.normal_()
        m.dt_projs_bias.add_(torch.randn_like(m.dt_projs_bias))
    x = torch.randn(2, m.d_inner, *size, dtype=torch.float64)
    with torch.no_grad():
        got = m.forward_core(x)
        ref = _loop_cross_scan(m, x)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_scan_called_like_official(monkeypatch):
    """One call per SS2D: u/delta (b, 4*d, l) in float32, B/C grouped (b, 4, n, l), softplus bias."""
    calls = []
    real = mambair_mod.selective_scan

    def spy(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kw):
        calls.append(dict(u=u.shape, dtype=u.dtype, A=A.shape, B=B.shape, C=C.shape, D=D.shape,
                          z=z, bias=delta_bias.shape, softplus=delta_softplus))
        return real(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, **kw)

    monkeypatch.setattr(mambair_mod, "selective_scan", spy)
    m = SS2D(d_model=8, d_state=4).to(torch.bfloat16)
    m(torch.randn(2, 3, 5, 8, dtype=torch.bfloat16))
    assert calls == [dict(u=(2, 64, 15), dtype=torch.float32, A=(64, 4), B=(2, 4, 4, 15), C=(2, 4, 4, 15),
                          D=(64,), z=None, bias=(64,), softplus=True)]


@pytest.mark.parametrize("scale,size", [(2, (5, 7)), (3, (4, 3)), (4, (3, 5))])
def test_sr_shapes_odd_sizes(scale, size):
    m = MambaIR(**TINY, upscale=scale, upsampler="pixelshuffle").eval()
    with torch.no_grad():
        out = m(torch.rand(1, 3, *size))
    assert out.shape == (1, 3, size[0] * scale, size[1] * scale)


def test_x1_global_residual():
    """x1 path: out = x + conv_last(...); with conv_last zeroed the input comes back exactly."""
    torch.manual_seed(0)
    m = MambaIR(**TINY, mlp_ratio=1.2, upscale=1, upsampler="").double().eval()
    x = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        assert m(x).shape == x.shape
        assert not torch.allclose(m(x), x)
        m.conv_last.weight.zero_()
        m.conv_last.bias.zero_()
        torch.testing.assert_close(m(x), x, rtol=0, atol=1e-15)


def test_state_dict_round_trip_strict(tmp_path):
    torch.manual_seed(0)
    a = MambaIR(**TINY, upscale=2, upsampler="pixelshuffle").eval()
    b = MambaIR(**TINY, upscale=2, upsampler="pixelshuffle").eval()
    torch.save(a.state_dict(), tmp_path / "w.pth")
    b.load_state_dict(torch.load(tmp_path / "w.pth", weights_only=True), strict=True)
    x = torch.rand(1, 3, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_official_init():
    m = SS2D(d_model=32, d_state=16)
    torch.testing.assert_close(m.A_logs[5], torch.log(torch.arange(1.0, 17.0)))
    assert torch.all(m.Ds == 1)
    dt = F.softplus(m.dt_projs_bias)  # the bias is the inverse softplus of dt in [1e-3, 1e-1]
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert m.dt_projs_weight.abs().max() <= m.dt_rank ** -0.5
