"""psnr_rgb (the training-time validation PSNR that picks best.pt) and quantize, against values
computed by hand: constant images with a known MSE give PSNR = 10 log10(1 / MSE) exactly."""
import math

import pytest
import torch

from bench.quality.evaluate import psnr_rgb, quantize


# differences exact in float32 (powers of two): MSE = diff^2 exactly
@pytest.mark.parametrize("diff, psnr", [(2 ** -1, 10 * math.log10(4)), (2 ** -3, 10 * math.log10(64)),
                                        (2 ** -5, 10 * math.log10(1024))])
def test_psnr_of_constant_images_with_a_known_mse(diff, psnr):
    x = torch.full((1, 3, 8, 8), 0.25)
    y = x + diff
    assert psnr_rgb(x, y) == pytest.approx(psnr, abs=1e-9)
    assert psnr_rgb(y, x) == pytest.approx(psnr, abs=1e-9)


def test_psnr_of_a_mixed_error_is_the_mean_squared_error_over_all_pixels():
    x = torch.zeros(1, 3, 4, 4)
    y = x.clone()
    y[0, 0, 0, 0] = 1.0  # one pixel of 48 off by 1: MSE = 1/48
    assert psnr_rgb(x, y) == pytest.approx(10 * math.log10(48), abs=1e-9)


def test_psnr_border_crop_ignores_exactly_the_border():
    x = torch.full((1, 3, 10, 10), 0.5)
    y = x.clone()
    y[..., :2, :] = 0.0  # errors only within 2 px of the top
    y[..., :, -2:] = 1.0  # and of the right edge
    y[..., 2:-2, 2:-2] += 0.125  # inside: MSE 1/64
    assert psnr_rgb(x, y, border=2) == pytest.approx(10 * math.log10(64), abs=1e-9)
    # whole image: 36 border pixels off by 0.5, the 36 inner ones by 1/8, 28 exact (of 100)
    assert psnr_rgb(x, y, border=0) == pytest.approx(
        -10 * math.log10((36 * 0.25 + 36 / 64) / 100), abs=1e-9)
    inner = torch.full((1, 3, 10, 10), 0.5)
    inner[..., 3:-3, 3:-3] = 0.75  # a 4x4 patch inside a border of 3: MSE 1/16 over it
    inner[..., 3:-3, 3] = 0.5  # one column of the patch without error: MSE 3/64
    assert psnr_rgb(torch.full_like(inner, 0.5), inner, border=3) == pytest.approx(
        10 * math.log10(64 / 3), abs=1e-9)


def test_psnr_of_identical_images_is_finite_and_high():
    x = torch.rand(1, 3, 5, 5)
    assert psnr_rgb(x, x) == pytest.approx(200.0)  # MSE floored at 1e-20


def test_psnr_is_computed_in_float64():
    x = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float16)
    y = torch.full((1, 3, 4, 4), 0.5 + 2 ** -9, dtype=torch.float16)  # exact in fp16
    assert psnr_rgb(x, y) == pytest.approx(10 * math.log10(2 ** 18), abs=1e-9)


def test_quantize_clamps_and_rounds_to_8_bit_levels():
    x = torch.tensor([-0.3, 0.0, 0.2, 0.5, 100 / 255 + 0.49 / 255, 100 / 255 + 0.51 / 255,
                      1.0, 1.7])
    # round(x * 255) / 255, after clamping to [0, 1]; 127.5 rounds half to even -> 128
    expected = torch.tensor([0, 0, 51, 128, 100, 101, 255, 255]) / 255
    assert torch.equal(quantize(x), expected)
