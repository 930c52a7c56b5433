"""Serpent model: scan paths are exact permutations, any input size, pinned sizes, training."""
import pytest
import torch

from serpent.model import (CONFIGS, PATHS, Serpent, clear_scan_orders_cache, merge_directions,
                           roll_back, unroll)
from serpent.registry import registered
from serpent.scan import reset_used_backends, used_backends

TINY = dict(embed_dim=8, depths=(1, 1), dec_depths=(1,), num_scales=2, d_state=4)


def explicit_orders(h, w, path):
    """(row, col) visiting order of the four directions, built by plain loops."""
    snake = path == "serpentine"
    rows = [(r, c) for r in range(h) for c in (reversed(range(w)) if snake and r % 2 else range(w))]
    cols = [(r, c) for c in range(w) for r in (reversed(range(h)) if snake and c % 2 else range(h))]
    return [rows, cols, rows[::-1], cols[::-1]]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("hw", [(5, 7), (4, 4), (1, 6), (6, 1)])
def test_unroll_matches_explicit_index_and_rolls_back(path, hw):
    h, w = hw
    x = torch.randn(2, 3, h, w)
    seqs = unroll(x, path)
    assert seqs.shape == (2, 4, 3, h * w)
    for k, order in enumerate(explicit_orders(h, w, path)):
        expected = torch.stack([x[..., r, c] for r, c in order], dim=-1)
        assert torch.equal(seqs[:, k], expected), k
    back = roll_back(seqs, h, w, path)
    for k in range(4):
        assert torch.equal(back[:, k], x)
    y = torch.randn(2, 4, 3, h * w)
    torch.testing.assert_close(merge_directions(y, h, w, path), roll_back(y, h, w, path).sum(1))


def test_serpentine_steps_are_neighbours_raster_jumps():
    """The reason serpentine is the default: every sequence step moves to a 4-neighbour."""
    h, w = 6, 9

    def steps(order):
        return [abs(r1 - r0) + abs(c1 - c0) for (r0, c0), (r1, c1) in zip(order, order[1:])]

    for order in explicit_orders(h, w, "serpentine"):
        assert set(steps(order)) == {1}
    rows = explicit_orders(h, w, "raster")[0]
    assert max(steps(rows)) == w and sum(s > 1 for s in steps(rows)) == h - 1


def test_unknown_path_rejected():
    with pytest.raises(ValueError, match="scan path"):
        unroll(torch.zeros(1, 1, 2, 2), "zigzag")


def test_registry_entries():
    reg = registered()
    for name in ("serpent", "serpent_t", "serpent_s", "serpent_b"):
        info = reg[name]
        assert info.family == "ssm" and info.multiple == 1 and info.upsampler is False
        assert set(info.tasks) == {"deblur", "denoise", "sr"} and "2403.17902" in info.reference
    assert reg["serpent"].fn is reg["serpent_s"].fn


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_pinned():
    counts = {name: n_params(Serpent(**cfg)) for name, cfg in CONFIGS.items()}
    assert counts == {"serpent_t": 1_121_171, "serpent_s": 3_371_811, "serpent_b": 10_467_507}


@pytest.mark.parametrize("task", ["deblur", "denoise", "sr"])
def test_odd_input_size_keeps_shape(task):
    from bench.registry import create_model

    torch.manual_seed(0)
    model = create_model("serpent_t", task=task, scale=8 if task == "sr" else None).eval()
    x = torch.rand(1, 3, 97, 131)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_global_residual_and_crop():
    """With the output conv zeroed the network is the identity: padding is cropped exactly."""
    model = Serpent(**TINY).eval()
    torch.nn.init.zeros_(model.conv_out.weight)
    torch.nn.init.zeros_(model.conv_out.bias)
    x = torch.rand(2, 3, 13, 21)
    with torch.no_grad():
        assert torch.equal(model(x), x)


def test_backends_agree_inside_the_model():
    torch.manual_seed(0)
    model = Serpent(**TINY).double().eval()
    x = torch.rand(1, 3, 19, 23, dtype=torch.float64)
    reset_used_backends()
    with torch.no_grad():
        ref = Serpent(**TINY, scan_backend="sequential").double().eval()
        ref.load_state_dict(model.state_dict())
        y, y_ref = model(x), ref(x)
    assert used_backends() == {"chunked", "sequential"}
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)


def test_forward_backward_cpu():
    torch.manual_seed(0)
    model = Serpent(**TINY)
    x = torch.rand(2, 3, 24, 20)
    model(x).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # every scan parameter of every scale receives gradient
    for n, g in grads.items():
        if any(k in n for k in ("A_logs", "x_proj_weight", "dt_projs")):
            assert g.abs().sum() > 0, n


def test_tiny_model_fits_a_fixed_batch():
    torch.manual_seed(0)
    model = Serpent(**TINY)
    clean = torch.rand(4, 3, 16, 16)
    noisy = clean + 0.1 * torch.randn_like(clean)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.l1_loss(model(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_scan_orders_cached_under_inference_mode_serve_training():
    """`bench run --mode both`: the orders cached by an inference call were inference tensors,
    and gather saves its index for backward: "Inference tensors cannot be saved for backward"."""
    clear_scan_orders_cache()
    x = torch.randn(1, 3, 5, 6)
    with torch.inference_mode():
        unroll(x)
    x.requires_grad_(True)
    unroll(x).square().sum().backward()
    torch.testing.assert_close(x.grad, 8 * x.detach())  # each pixel in 4 sequences, d(s^2) = 2s


def test_infer_then_train_then_infer_in_one_process():
    """The sequence users run (`bench train --val-set`, `bench run --mode both`) on CPU."""
    import threading

    from bench.registry import create_model
    from serpent import scan

    clear_scan_orders_cache()
    scan._WORKSPACE = threading.local()  # fresh CPU workspaces, first allocated below
    torch.manual_seed(0)
    model = create_model("serpent_t", task="deblur").eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        first = model(x)
    model.train()
    model(x).abs().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.inference_mode():
        again = model(x)
    assert torch.equal(first, again)


@pytest.mark.slow
def test_compile_fullgraph_serpent_t_matches_eager():
    """torch.compile(fullgraph=True) traces serpent_t on the CPU (unfused path, chunked scan op)
    without a graph break (no lru_cache in the traced path) and matches eager, gradients too.
    Dynamo only (backend "eager", ~20 s here; aot_eager takes ~90 s): AOTAutograd over the
    custom ops is covered by test_opcheck and the fused block's compile test."""
    from bench.registry import create_model

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("serpent_t", task="deblur")
    x = torch.rand(1, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    y, y_eager = compiled(x), model(x)
    torch.testing.assert_close(y, y_eager)
    wrt = [model.patch_embed.weight, model.bottleneck.blocks[0].mixer.ssms[2].A_logs]
    for a, b in zip(torch.autograd.grad(y.square().mean(), wrt),
                    torch.autograd.grad(y_eager.square().mean(), wrt)):
        torch.testing.assert_close(a, b)
