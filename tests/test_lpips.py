"""LPIPS from a local weights folder (--lpips-weights): the plumbing is checked against the
LPIPS formula written out here, with locally made AlexNet and linear-layer weights (no network,
no fake numbers): LPIPS(x, y) = sum over the five ReLU outputs l of AlexNet of the spatial mean
of w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2, inputs mapped [0,1] -> [-1,1] and then shifted
and scaled per channel (LPIPS v0.1)."""
import pytest
import torch
import torchvision

from bench.quality.evaluate import lpips_weight_files, make_lpips

pytest.importorskip("pyiqa")

SHIFT = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64)[None, :, None, None]
SCALE = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64)[None, :, None, None]
RELU_ENDS = (2, 5, 8, 10, 12)  # alexnet.features[:k] ends with relu1 .. relu5
CHANNELS = (64, 192, 384, 256, 256)


def _weights(folder):
    torch.manual_seed(0)
    alex = torchvision.models.alexnet()  # random init: any weights test the plumbing
    alex_file, lin_file = lpips_weight_files(folder)
    torch.save(alex.state_dict(), alex_file)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(CHANNELS)}
    torch.save(lins, lin_file)
    return alex, lins


def _expected(alex, lins, x, y):
    feats = alex.features.double().eval()
    a, b = ((t.double() * 2 - 1 - SHIFT) / SCALE for t in (x, y))
    total, start = 0.0, 0
    for i, end in enumerate(RELU_ENDS):
        a, b = feats[start:end](a), feats[start:end](b)
        start = end
        na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = lins[f"lin{i}.model.1.weight"].double()
        total += ((na - nb) ** 2 * w).sum(1).mean().item()
    return total


def test_lpips_from_a_weights_folder_matches_the_formula(tmp_path):
    alex, lins = _weights(tmp_path)
    metric, status = make_lpips("cpu", tmp_path)
    assert metric is not None, status
    assert status.startswith("ok") and str(tmp_path) in status
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, 3, 64, 72, generator=g), torch.rand(1, 3, 64, 72, generator=g)
    got = float(metric(x, y).item())
    assert got == pytest.approx(_expected(alex, lins, x, y), rel=1e-4)
    assert float(metric(x, x).item()) == pytest.approx(0.0, abs=1e-6)


def test_lpips_unavailable_says_why_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("SERPENT_BENCH_LPIPS_WEIGHTS", raising=False)
    metric, status = make_lpips("cpu", tmp_path)  # empty folder
    assert metric is None and status.startswith("unavailable: weights not found")
    assert "alexnet-owt-7be5be79.pth" in status


def test_lpips_rejects_a_file_that_is_not_lpips_layers(tmp_path):
    _weights(tmp_path)
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, lpips_weight_files(tmp_path)[1])
    metric, status = make_lpips("cpu", tmp_path)
    assert metric is None and "does not hold LPIPS v0.1 alex linear layers" in status
