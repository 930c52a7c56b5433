"""Degradation operators against analytic expectations and independent references."""
import math

import pytest
import torch
import torch.nn.functional as F

from bench.errors import UsageError
from bench.quality.tasks import (add_noise, blur, blur_matrix, degrade, eval_pair, eval_seed,
                                 gaussian_kernel1d, gaussian_kernel2d, imresize, make_task,
                                 mod_crop, parse_level, resize_matrix)


def test_kernel_sums_to_one_and_matches_matlab_fspecial():
    from pyiqa.matlab_utils import fspecial  # independent port of MATLAB's fspecial

    k = gaussian_kernel2d(3.0, 61)
    assert k.shape == (61, 61)
    assert k.sum().item() == pytest.approx(1.0, abs=1e-12)
    ref = fspecial(61, 3.0, 1).squeeze().double()
    assert torch.allclose(k, ref, atol=1e-7, rtol=0)
    # Analytic ratio between the centre and a tap one sigma away along an axis.
    assert (k[30, 30] / k[30, 33]).item() == pytest.approx(math.exp(0.5), rel=1e-12)


def test_blur_of_a_delta_is_the_kernel():
    x = torch.zeros(1, 3, 101, 91, dtype=torch.float64)
    x[..., 50, 45] = 1.0
    y = blur(x, 3.0, 61)
    k = gaussian_kernel2d(3.0, 61)
    assert torch.allclose(y[0, :, 20:81, 15:76], k.expand(3, 61, 61), atol=1e-15)
    y[..., 20:81, 15:76] = 0
    assert y.abs().max().item() < 1e-15


def test_blur_reflect_boundary_equals_padded_2d_convolution():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 52, dtype=torch.float64)
    k = gaussian_kernel2d(2.0, 21)
    ref = F.conv2d(F.pad(x, (10,) * 4, mode="reflect"), k.expand(3, 1, 21, 21), groups=3)
    assert torch.allclose(blur(x, 2.0, 21), ref, atol=1e-13)
    # the 'valid' path (training) on the padded image gives the same numbers
    assert torch.allclose(blur(F.pad(x, (10,) * 4, mode="reflect"), 2.0, 21, "valid"), ref,
                          atol=1e-13)
    # per-item sigmas
    y = blur(x, torch.tensor([1.0, 2.0]), 21)
    assert torch.allclose(y[1], ref[1], atol=1e-13)
    assert not torch.allclose(y[0], ref[0], atol=1e-3)


def test_blur_rejects_images_smaller_than_the_kernel_radius():
    with pytest.raises(UsageError, match="too small"):
        blur(torch.zeros(1, 3, 20, 100), 3.0, 61)


@pytest.mark.parametrize("s", [2, 3, 4, 8])
def test_bicubic_matches_matlab_imresize_port_and_shapes(s):
    from pyiqa.matlab_utils import imresize as ref_imresize  # Son's MATLAB-exact port

    torch.manual_seed(s)
    x = torch.rand(1, 3, 12 * s, 9 * s, dtype=torch.float64)
    down = imresize(x, s, down=True)
    assert down.shape == (1, 3, 12, 9)
    assert torch.allclose(down, ref_imresize(x, scale=1 / s).double(), atol=1e-6)
    up = imresize(down, s, down=False)
    assert up.shape == x.shape
    assert torch.allclose(up, ref_imresize(down, scale=s).double(), atol=1e-5)
    c = torch.full((1, 3, 8 * s, 8 * s), 0.3, dtype=torch.float64)  # partition of unity
    assert torch.allclose(imresize(c, s, down=True), torch.tensor(0.3, dtype=torch.float64))


def test_mod_crop_and_sr_eval_shapes():
    hr = torch.rand(1, 3, 101, 67)
    assert mod_crop(hr, 8).shape == (1, 3, 96, 64)
    cfg = make_task("sr", scale=8)
    gt, inp_up, shown = eval_pair(hr, "x", cfg, upsampler=True)
    assert gt.shape == (1, 3, 96, 64) and inp_up.shape == (1, 3, 12, 8)
    _, inp_x1, _ = eval_pair(hr, "x", cfg, upsampler=False)
    assert inp_x1.shape == gt.shape and torch.equal(inp_x1, shown)


def test_noise_statistics():
    cfg = make_task("denoise")
    hr = torch.full((1, 3, 256, 256), 0.5)
    _, inp, _ = eval_pair(hr, "flat", cfg, upsampler=False)
    n = (inp.double() - 0.5).flatten()
    sigma = 25 / 255
    assert abs(n.mean().item()) < 4 * sigma / math.sqrt(n.numel())
    assert n.std().item() == pytest.approx(sigma, rel=0.01)
    # no clipping: values outside [0, 1] are kept (float inputs, documented)
    assert inp.max() > 0.5 + 3 * sigma


def test_eval_degradation_is_deterministic_per_image_and_task():
    torch.manual_seed(0)
    hr = torch.rand(1, 3, 64, 64)
    cfg = make_task("deblur")
    a = eval_pair(hr, "Set5/baby", cfg, False)[1]
    torch.manual_seed(123)  # the global RNG must not matter
    b = eval_pair(hr, "Set5/baby", cfg, False)[1]
    assert a.dtype == torch.float32 and a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.equal(a, eval_pair(hr, "Set5/bird", cfg, False)[1])
    other = make_task("deblur", noise_sigma=0.02)
    assert eval_seed("Set5/baby", cfg) != eval_seed("Set5/baby", other)
    # SR: the LR image of an upsampler model and the bicubic input of an x1 model share the LR
    sr = make_task("sr", scale=4, noise_sigma=0.01)
    lr = eval_pair(hr, "i", sr, True)[1]
    up = eval_pair(hr, "i", sr, False)[1]
    assert torch.allclose(imresize(lr.double(), 4, down=False).float(), up, atol=1e-6)


def test_task_config_parsing_and_errors():
    assert make_task("sr").scale == 8
    assert make_task("denoise").noise_sigma == pytest.approx(25 / 255)
    assert make_task("deblur").key == "deblur:sigma=3,ksize=61,noise=0.01"
    r = make_task("deblur", blur_sigma=(1.0, 4.0))
    assert r.blur_sigma == 3.0 and r.train_ranges()[0] == (1.0, 4.0)
    assert parse_level("25/255") == pytest.approx(25 / 255)
    assert parse_level("0:50/255") == (0.0, pytest.approx(50 / 255))
    with pytest.raises(UsageError):
        make_task("deblur", scale=4)
    with pytest.raises(UsageError):
        make_task("sr", scale=5)
    with pytest.raises(UsageError):
        make_task("deblur", kernel_size=60)
    with pytest.raises(UsageError):
        parse_level("abc")


def test_kernel_taps_in_float64_for_each_sigma():
    sig = torch.tensor([1.3, 0.7], dtype=torch.float64)
    k = gaussian_kernel1d(sig, 9)
    assert k.dtype == torch.float64 and k.shape == (2, 9)
    for row, s in zip(k, (1.3, 0.7)):  # each row normalised on its own
        g = torch.tensor([math.exp(-(i - 4) ** 2 / (2 * s * s)) for i in range(9)],
                         dtype=torch.float64)
        assert torch.allclose(row, g / g.sum(), rtol=1e-14, atol=0)
    k2 = gaussian_kernel2d(1.3, 9)
    assert k2.dtype == torch.float64
    assert torch.allclose(k2, torch.outer(k[0], k[0]), rtol=1e-14, atol=0)


def test_blur_matrix_boundaries_and_errors():
    assert blur_matrix(31, 3.0, 61).shape == (31, 31)  # reflect is the default padding
    with pytest.raises(UsageError, match="too small"):
        blur_matrix(30, 3.0, 61)  # side == radius: reflect padding impossible
    assert blur_matrix(61, 3.0, 61, padding="valid").shape == (1, 61)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        blur_matrix(60, 3.0, 61, padding="valid")
    with pytest.raises(ValueError, match="circular"):
        blur_matrix(64, 3.0, 61, padding="circular")


def test_blur_float32_input_and_an_inexact_sigma():
    torch.manual_seed(1)
    x = torch.rand(1, 3, 30, 34, dtype=torch.float64)
    k = gaussian_kernel2d(1.3, 11)
    ref = F.conv2d(F.pad(x, (5,) * 4, mode="reflect"), k.expand(3, 1, 11, 11), groups=3)
    assert torch.allclose(blur(x, 1.3, 11), ref, atol=1e-14, rtol=0)
    y = blur(x.float(), 1.3, 11)
    assert y.dtype == torch.float32 and torch.allclose(y.double(), ref, atol=1e-6)


def test_add_noise_per_item_sigma_sign_dtype_and_no_op():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    y = add_noise(x, torch.tensor([0.0, 0.1], dtype=torch.float64), g)
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert y.dtype == torch.float64
    assert torch.equal(y[0], x[0]) and torch.equal(y[1], x[1] + 0.1 * n[1])
    assert torch.equal(add_noise(x, 0.05, torch.Generator().manual_seed(3)), x + 0.05 * n)
    assert add_noise(x, 0.0, g) is x  # nothing drawn, nothing copied
    img = torch.rand(3, 5, 5, dtype=torch.float64)  # (C, H, W): one sigma for the image
    n3 = torch.randn(img.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.equal(add_noise(img, 0.2, torch.Generator().manual_seed(4)), img + 0.2 * n3)


def test_degrade_applies_the_task_and_its_overrides():
    torch.manual_seed(2)
    hr = torch.rand(1, 3, 72, 72, dtype=torch.float64)
    cfg = make_task("deblur", noise_sigma=0.0)
    assert torch.equal(degrade(hr, cfg), blur(hr, 3.0, 61))
    assert torch.equal(degrade(hr, cfg, blur_sigma=1.5), blur(hr, 1.5, 61))
    assert degrade(hr, cfg, blur_padding="valid").shape == (1, 3, 12, 12)
    noisy = degrade(hr, cfg, noise_sigma=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, add_noise(blur(hr, 3.0, 61), 0.1, torch.Generator().manual_seed(0)))
    assert torch.equal(degrade(hr, make_task("denoise", noise_sigma=0.0)), hr)
    assert torch.equal(degrade(hr, make_task("sr", scale=4)), imresize(hr, 4, down=True))


def test_eval_pair_computes_in_float64():
    """A float32 image is degraded in float64 and cast once: the same bytes as from float64."""
    torch.manual_seed(3)
    hr = torch.rand(1, 3, 64, 64)
    for cfg in (make_task("deblur"), make_task("sr", scale=4)):
        a = eval_pair(hr, "img", cfg, upsampler=False)
        b = eval_pair(hr.double(), "img", cfg, upsampler=False)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_eval_seed_is_the_documented_sha256():
    import hashlib

    cfg = make_task("deblur")
    for image in ("Set5/baby", "Set5/bird", "Set14/lenna", "Kodak24/kodim01", "x", "y", "z"):
        digest = hashlib.sha256(f"{image}|{cfg.key}".encode()).digest()
        assert eval_seed(image, cfg) == int.from_bytes(digest[:8], "little") % 2 ** 63


def test_resize_of_images_without_a_batch_axis_and_row_sums():
    torch.manual_seed(4)
    x = torch.rand(3, 16, 24, dtype=torch.float64)  # (C, H, W)
    assert torch.equal(imresize(x, 4, down=True), imresize(x[None], 4, down=True)[0])
    assert mod_crop(torch.zeros(3, 17, 26), 8).shape == (3, 16, 24)
    with pytest.raises(ValueError, match="not divisible by 4"):
        imresize(torch.zeros(1, 3, 16, 18), 4, down=True)  # only the width is off
    for s in (1 / 3, 1 / 8, 2.0):  # every output pixel is a weighted mean (weights sum to 1)
        m = resize_matrix(24, int(24 * s), s)
        assert torch.allclose(m.sum(1), torch.ones(m.shape[0], dtype=torch.float64),
                              rtol=0, atol=1e-14)
