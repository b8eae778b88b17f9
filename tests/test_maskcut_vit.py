"""DINO ViT features: pos-embed resampling, truncated forward == full timm forward, checkpoint loading."""
import math

import pytest
import torch
import torch.nn.functional as F

from cutler.maskcut.vit import (CheckpointMismatchError, DinoFeatureExtractor, build_vit, extract_state_dict,
                                interpolate_pos_embed, load_dino_checkpoint)




@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return DinoFeatureExtractor("small", 16, "k")


def test_pos_embed_resampling_uses_dino_scale_factor():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 14 * 14, 8)
    out = interpolate_pos_embed(pe, 30, 30)
    assert out.shape == (1, 1 + 900, 8)
    torch.testing.assert_close(out[:, 0], pe[:, 0])
    grid = pe[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(30.1 / 14, 30.1 / 14), mode="bicubic")
    torch.testing.assert_close(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 900, 8))
    by_size = F.interpolate(grid, size=(30, 30), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 900, 8)
    assert (out[:, 1:] - by_size).abs().max() > 1e-4  # the two resamplings really differ
    assert interpolate_pos_embed(pe, 14, 14) is pe


def test_truncated_forward_equals_full_timm_forward(extractor):
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    feats = extractor(x)
    assert feats.shape == (2, 196, 384)
    captured = {}
    vit = extractor.vit
    hook = vit.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: captured.setdefault("qkv", o))
    try:
        xn = (x.float() / 255 - extractor.mean) / extractor.std
        vit.forward_features(xn)  # native 14x14 grid: timm's own pos-embed path
    finally:
        hook.remove()
    qkv = captured["qkv"].reshape(2, 197, 3, 6, 64)
    k = qkv[:, 1:, 1].reshape(2, 196, 384)
    torch.testing.assert_close(feats, k, rtol=1e-5, atol=1e-5)


def test_autocast_dtype_on_cpu(extractor):
    """``auto`` is float32 on CPU; an explicit ``bfloat16`` runs the ViT in bf16 there too (close, not equal)."""
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    try:
        ref = extractor(x)
        extractor.amp_dtype = "auto"
        assert torch.equal(extractor(x), ref)
        extractor.amp_dtype = "bfloat16"
        low = extractor(x)
        assert low.dtype == torch.float32 and not torch.equal(low, ref)
        rel = (low - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert float(rel.max()) < 0.05  # bf16 keeps 8 significant bits
        extractor.amp_dtype = "int8"
        with pytest.raises(ValueError, match="int8"):
            extractor(x)
    finally:
        extractor.amp_dtype = "auto"


def test_feature_kinds_and_other_grids():
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        kqv = DinoFeatureExtractor("small", 16, "kqv")
    x = torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8)
    f = kqv(x)
    assert f.shape == (1, 6 * 8, 3 * 384) and kqv.feat_dim == 3 * 384
    for kind, sl in (("k", slice(0, 384)), ("q", slice(384, 768)), ("v", slice(768, 1152))):
        kqv.feat = kind
        torch.testing.assert_close(kqv(x), f[..., sl])
    with pytest.raises(ValueError, match="multiple of the patch"):
        kqv(torch.zeros(1, 3, 100, 96, dtype=torch.uint8))


def test_checkpoint_plain_and_wrapped(tmp_path, extractor):
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    ref = extractor(x)
    sd = extractor.vit.state_dict()
    plain = tmp_path / "plain.pth"
    torch.save(sd, plain)
    wrapped = tmp_path / "full.pth"
    teacher = {f"module.backbone.{k}": v for k, v in sd.items()}
    teacher["module.head.mlp.0.weight"] = torch.zeros(4, 4)  # DINO projection head: not part of the ViT
    torch.save({"teacher": teacher, "student": {}, "epoch": 100}, wrapped)
    for path in (plain, wrapped):
        other = DinoFeatureExtractor("small", 16, "k", pretrain_path=str(path))
        assert not other.random_init
        torch.testing.assert_close(other(x), ref)
    assert set(extract_state_dict({"model": sd})) == set(sd)


def test_checkpoint_mismatch_and_missing(tmp_path):
    small = build_vit("small", 16).state_dict()
    path = tmp_path / "small.pth"
    torch.save(small, path)
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_dino_checkpoint(build_vit("small", 8), str(path))
    del small["blocks.3.attn.qkv.weight"]
    small["extra.weight"] = torch.zeros(1)
    torch.save(small, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: blocks\.3\.attn\.qkv\.weight.*unexpected keys: extra"):
        load_dino_checkpoint(build_vit("small", 16), str(path))
    with pytest.raises(FileNotFoundError):
        load_dino_checkpoint(build_vit("small", 16), str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="no downloads"):
        load_dino_checkpoint(build_vit("small", 16), "https://dl.fbaipublicfiles.com/dino/x.pth")


def test_checkpoint_with_other_pos_grid_is_resampled(tmp_path):
    sd = build_vit("small", 16).state_dict()
    sd["pos_embed"] = torch.randn(1, 1 + 28 * 28, 384)  # trained at 448 px
    path = tmp_path / "ck.pth"
    torch.save(sd, path)
    ext = DinoFeatureExtractor("small", 16, "k", pretrain_path=str(path))
    assert ext.vit.pos_embed.shape[1] == 1 + 784
    assert ext(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 16, 384)
    assert math.isfinite(float(ext.vit.pos_embed.sum()))
