"""bench.quality.weights: strict, safe checkpoint loading; official state-dict layouts pinned."""
import re

import pytest
import torch

import bench
from baselines.restormer import Restormer
from bench.errors import UsageError
from bench.quality.weights import load_weights

TINY = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 2, 2])


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return Restormer(**{**TINY, **kw})


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip(tmp_path):
    src, dst = model(0), model(1)
    assert not same_weights(src, dst)
    torch.save(src.state_dict(), tmp_path / "plain.pth")
    assert load_weights(dst, tmp_path / "plain.pth") is None
    assert same_weights(src, dst)


@pytest.mark.parametrize("wrap,used", [
    (lambda sd: {"params": sd}, "params"),
    (lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}}, "state_dict"),
    (lambda sd: {"model": {"_orig_mod." + k: v for k, v in sd.items()}, "epoch": 3}, "model"),
])
def test_wrapped_checkpoints(tmp_path, wrap, used):
    src, dst = model(0), model(1)
    torch.save(wrap(src.state_dict()), tmp_path / "w.pth")
    assert load_weights(dst, tmp_path / "w.pth") == used
    assert same_weights(src, dst)


def test_params_preferred_like_official_loaders_unless_key_given(tmp_path):
    ema, raw, dst = model(0), model(1), model(2)
    torch.save({"params_ema": ema.state_dict(), "params": raw.state_dict()}, tmp_path / "b.pth")
    assert load_weights(dst, tmp_path / "b.pth") == "params"
    assert same_weights(raw, dst)
    assert load_weights(dst, tmp_path / "b.pth", key="params_ema") == "params_ema"
    assert same_weights(ema, dst)
    torch.save({"params_ema": ema.state_dict()}, tmp_path / "e.pth")
    assert load_weights(model(3), tmp_path / "e.pth") == "params_ema"
    with pytest.raises(UsageError, match="no key 'net_g'"):
        load_weights(dst, tmp_path / "b.pth", key="net_g")


def test_mismatch_names_missing_unexpected_and_shapes(tmp_path):
    sd = model(0, LayerNorm_type="WithBias").state_dict()
    norm_biases = [k for k in sd if k.endswith("body.bias")]
    assert len(norm_biases) == 16  # 8 blocks x 2 LayerNorms
    sd["extra.weight"] = torch.zeros(1)
    sd["output.weight"] = torch.zeros(3, 16, 5, 5)
    torch.save({"params": sd}, tmp_path / "m.pth")
    dst = model(1, LayerNorm_type="BiasFree")  # has no LayerNorm biases
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(UsageError) as err:
        load_weights(dst, tmp_path / "m.pth")
    msg = str(err.value)
    assert "\n" not in msg and "(under 'params')" in msg
    assert "17 unexpected keys (encoder_level1.0.norm1.body.bias, " in msg
    assert "7 more" in msg  # ten named, the count of the rest
    assert ("1 shape mismatches (output.weight: checkpoint (3, 16, 5, 5) vs model (3, 16, 3, 3))"
            in msg)
    assert "missing keys" not in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # untouched

    dst = model(2)
    sd = {k: v for k, v in dst.state_dict().items() if not k.endswith("norm1.body.weight")}
    torch.save(sd, tmp_path / "m2.pth")
    first = r"encoder_level1\.0\.norm1\.body\.weight"
    with pytest.raises(UsageError, match=rf"8 missing keys \({first}"):
        load_weights(dst, tmp_path / "m2.pth")


def test_non_strict_tolerates_missing_not_shapes(tmp_path):
    src, dst = model(0), model(1)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("output")}
    torch.save(sd, tmp_path / "p.pth")
    load_weights(dst, tmp_path / "p.pth", strict=False)
    assert torch.equal(dst.patch_embed.proj.weight, src.patch_embed.proj.weight)
    sd["patch_embed.proj.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "p.pth")
    with pytest.raises(UsageError, match="shape mismatches"):
        load_weights(dst, tmp_path / "p.pth", strict=False)


class Payload:
    """Unpickling this would run code (creates a file): weights_only must refuse first."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"params": {"w": torch.zeros(1)}, "cfg": Payload(str(marker))}, tmp_path / "x.pth")
    assert not marker.exists() or marker.unlink() is None
    with pytest.raises(UsageError, match=r"refused: not a plain tensor checkpoint .*Unsupported"):
        load_weights(model(0), tmp_path / "x.pth")
    assert not marker.exists()


def test_unreadable_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_weights(model(0), tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UsageError, match="cannot read as a torch checkpoint"):
        load_weights(model(0), tmp_path / "junk.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(UsageError, match="expected a state dict"):
        load_weights(model(0), tmp_path / "list.pth")


# --------------------------------------------------------------------------- official layouts
# Names and shapes read off the official model definitions; an official checkpoint has exactly
# these keys, so matching them is what lets it load with strict=True.

SWINIR_X4 = {
    "conv_first.weight": (180, 3, 3, 3),
    "patch_embed.norm.weight": (180,),
    "layers.0.residual_group.blocks.0.attn.relative_position_bias_table": (225, 6),
    "layers.0.residual_group.blocks.0.attn.relative_position_index": (64, 64),
    "layers.0.residual_group.blocks.0.attn.qkv.weight": (540, 180),
    "layers.0.residual_group.blocks.0.attn.proj.bias": (180,),
    "layers.0.residual_group.blocks.0.mlp.fc1.weight": (360, 180),
    "layers.0.residual_group.blocks.0.mlp.fc2.weight": (180, 360),
    "layers.0.residual_group.blocks.1.attn_mask": (64, 64, 64),  # img_size 64: 8x8 windows
    "layers.5.residual_group.blocks.5.norm2.bias": (180,),
    "layers.5.conv.weight": (180, 180, 3, 3),
    "norm.weight": (180,),
    "conv_after_body.weight": (180, 180, 3, 3),
    "conv_before_upsample.0.weight": (64, 180, 3, 3),
    "upsample.0.weight": (256, 64, 3, 3),
    "upsample.2.weight": (256, 64, 3, 3),
    "conv_last.weight": (3, 64, 3, 3),
}
SWINIR_DN = {
    "layers.3.residual_group.blocks.3.attn_mask": (256, 64, 64),  # img_size 128: 16x16 windows
    "conv_last.weight": (3, 180, 3, 3),
}
RESTORMER = {
    "patch_embed.proj.weight": (48, 3, 3, 3),
    "encoder_level1.0.norm1.body.weight": (48,),
    "encoder_level1.0.norm1.body.bias": (48,),
    "encoder_level1.0.attn.temperature": (1, 1, 1),
    "encoder_level1.0.attn.qkv.weight": (144, 48, 1, 1),
    "encoder_level1.0.attn.qkv_dwconv.weight": (144, 1, 3, 3),
    "encoder_level1.0.attn.project_out.weight": (48, 48, 1, 1),
    "encoder_level1.0.ffn.project_in.weight": (254, 48, 1, 1),
    "encoder_level1.0.ffn.dwconv.weight": (254, 1, 3, 3),
    "encoder_level1.0.ffn.project_out.weight": (48, 127, 1, 1),
    "down1_2.body.0.weight": (24, 48, 3, 3),
    "latent.7.attn.temperature": (8, 1, 1),
    "up4_3.body.0.weight": (768, 384, 3, 3),
    "reduce_chan_level3.weight": (192, 384, 1, 1),
    "decoder_level1.0.attn.temperature": (1, 1, 1),
    "decoder_level1.3.attn.qkv.weight": (288, 96, 1, 1),
    "refinement.3.ffn.project_out.weight": (96, 255, 1, 1),
    "output.weight": (3, 96, 3, 3),
}


def shapes(name, **kw):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in bench.create_model(name, **kw).state_dict().items()}


def test_official_swinir_layout():
    sr = shapes("swinir", task="sr", scale=4)
    assert {k: sr.get(k) for k in SWINIR_X4} == SWINIR_X4
    # 6 RSTBs x (6 blocks x 14 tensors + 3 shifted-block masks + conv w/b) + 16 outside
    assert len(sr) == 550
    assert "layers.0.residual_group.blocks.0.attn_mask" not in sr  # unshifted: buffer is None
    assert not any(re.search(r"(^|\.)mean$", k) for k in sr)  # official mean is not saved
    dn = shapes("swinir", task="denoise")
    assert {k: dn.get(k) for k in SWINIR_DN} == SWINIR_DN
    assert len(dn) == 544 and not any(k.startswith("upsample") for k in dn)


def test_official_restormer_layout():
    deblur = shapes("restormer", task="deblur")
    assert {k: deblur.get(k) for k in RESTORMER} == RESTORMER
    assert len(deblur) == 494  # 44 blocks x 11 tensors + 10 convs
    denoise = shapes("restormer", task="denoise")  # BiasFree: no LayerNorm biases
    assert len(denoise) == 494 - 88 and "encoder_level1.0.norm1.body.bias" not in denoise


def test_strict_load_of_a_full_swinir_checkpoint(tmp_path):
    """Buffers (attn_mask, relative_position_index) are part of the official checkpoints."""
    src = bench.create_model("swinir", task="sr", scale=2, embed_dim=12, num_heads=[2, 2],
                             depths=[2, 2], img_size=16)
    torch.save({"params": src.state_dict()}, tmp_path / "s.pth")
    dst = bench.create_model("swinir", task="sr", scale=2, embed_dim=12, num_heads=[2, 2],
                             depths=[2, 2], img_size=16)
    assert load_weights(dst, tmp_path / "s.pth") == "params"
    assert same_weights(src, dst)
    other = bench.create_model("swinir", task="sr", scale=2, embed_dim=12, num_heads=[2, 2],
                               depths=[2, 2], img_size=24)  # like a s48 file into an s64 model
    first = r"layers\.0\.residual_group\.blocks\.1\.attn_mask"
    with pytest.raises(UsageError, match=rf"2 shape mismatches \({first}: checkpoint "
                                         r"\(4, 64, 64\) vs model \(9, 64, 64\)"):
        load_weights(other, tmp_path / "s.pth")
