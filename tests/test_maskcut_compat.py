"""The published-compatible MaskCut mode against our default conventions: each case where the published
script leaves the result to rounding (eigenvector sign with >= 3 corners, ties at the mean, ties at the
seed) is built by construction and both behaviours are pinned; plus the published dtypes of the affinity,
DINO's float32 ViT forward, the settings in the pipeline and the published output format."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from cutler.config import MaskCutConfig
from cutler.maskcut import ncut
from cutler.maskcut import pipeline as pl
from cutler.maskcut.writer import merge_outputs

TINY = MaskCutConfig(vit_arch="small", patch_size=16, fixed_size=64, n=3, batch_size=2, num_workers=0,
                     crf="none", crf_workers=-1, chunk_size=4, device="cpu")


def _both(x, grid):
    """(default, published) bipartitions of a solver's ``(P,)`` float64 ``x`` as (fg index list, seed); the
    default solvers hand over the canonical sign."""
    x = torch.as_tensor(x, dtype=torch.float64)[None]
    out = []
    for fg, seed in (ncut.bipartition(ncut.canonical_sign(x), grid), ncut.published_bipartition(x, grid)):
        out.append((fg[0].nonzero().flatten().tolist(), int(seed[0])))
    return out


def _cluster_features(labels, centres):
    """``(1, P, C)`` float32 features: patch ``i`` gets ``centres[labels[i]]`` (identical rows per cluster)."""
    return torch.as_tensor(np.asarray(centres, dtype=np.float32)[np.asarray(labels)])[None]


def _mask(out, stage=0):
    return out.masks[0, stage].flatten().nonzero().flatten().tolist()


def _force_eigenvector(monkeypatch, edit):
    """Make the scipy solve return ``edit(x)`` instead of LAPACK's ``x`` (a controlled 'rounding')."""
    real = ncut.scipy_second_eigenpair

    def solve(a):
        w, x = real(a)
        return w, edit(np.array(x))

    monkeypatch.setattr(ncut, "scipy_second_eigenpair", solve)


# ------------------------------------------------------------------------------ the sign of x
def test_sign_with_three_corners_pure_rule():
    grid = (4, 5)
    x = np.full(20, -1.0)
    x[[0, 4, 15]] = 5.0  # the peak's side holds 3 corners
    x[12] = -2.0
    default_pos, published_pos = _both(x, grid)
    default_neg, published_neg = _both(-x, grid)
    rest = [i for i in range(20) if i not in (0, 4, 15)]
    # ours: the same answer whatever sign the solver returns (reversed: the side without the peak)
    assert default_pos == default_neg == (rest, 12)
    # published: the peak positive gives ours, the peak negative keeps the peak's side
    assert published_pos == (rest, 12)
    assert published_neg == ([0, 4, 15], 0)
    assert not ncut.convention_events(torch.tensor(x)[None], grid)["sign"].item()
    assert ncut.convention_events(torch.tensor(-x)[None], grid)["sign"].item()


@pytest.mark.parametrize("lapack_sign", [1.0, -1.0])
def test_sign_with_three_corners_through_the_solve(monkeypatch, lapack_sign):
    h = w = 6
    labels = np.zeros(h * w, int)
    corners = [0, w - 1, (h - 1) * w]
    labels[corners] = 1  # three corners share a feature: the small side, hence the peak
    feats = _cluster_features(labels, [[0.0, 1.0], [1.0, 0.0]])

    def sign(x):  # LAPACK's sign forced; the corners' tie made exact so that only the sign matters
        x = x * lapack_sign * np.sign(x[np.argmax(np.abs(x))])
        x[corners] = x[corners[0]]
        return x

    _force_eigenvector(monkeypatch, sign)
    rest = [i for i in range(h * w) if labels[i] == 0]
    for solver in ("exact", "fast"):
        assert _mask(ncut.maskcut_patches(feats, (h, w), 1, 0.15, solver=solver)) == rest
    pub = ncut.maskcut_patches(feats, (h, w), 1, 0.15, compat="published")
    # peak negative: the published rule keeps the peak's side; its seed (patch 0) is an isolated corner
    assert _mask(pub) == (rest if lapack_sign > 0 else [0])
    assert ncut.convention_events(pub.eigvecs[:, 0], (h, w))["sign"].item() == (lapack_sign < 0)


# ------------------------------------------------------------------------------ ties at the mean
def test_mean_tie_pure_rule():
    grid = (5, 6)
    peak, low = 8, 13  # not corners
    for t in np.linspace(0.1, 0.9, 400):
        x = np.full(30, t)
        x[peak], x[low] = 2 * t, 0.0  # the exact mean is t: 28 entries tie with it
        if np.sum(x) / 30 < t:  # rounding puts the ties above the computed mean
            break
    else:
        pytest.fail("no rounding-decided mean found")
    default, published = _both(x, grid)
    assert default == ([peak], peak)  # ours: ties are not foreground, as in exact arithmetic
    # published: the 28 ties and the peak pass `x > mean`; 4 corners reverse it to the low entry
    assert published == ([low], low)
    assert ncut.convention_events(torch.tensor(x)[None], grid)["mean_tie"].item()


def _chain_graph(h=10, w=10):
    """A near-complete graph: A and B (4 patches each) are similar to the rest R but not to each other,
    so x is antisymmetric: x_A = -x_B and every R entry equals the mean (0) in exact arithmetic."""
    labels = np.zeros(h * w, int)
    a_idx, b_idx = [22, 23, 32, 33], [66, 67, 76, 77]
    labels[a_idx], labels[b_idx] = 1, 2
    feats = _cluster_features(labels, [[0.0, 0.0, 1.0], [1.0, 0.0, 0.3], [0.0, 1.0, 0.3]])
    return feats, labels, a_idx


def test_mean_tie_through_the_solve(monkeypatch):
    feats, labels, a_idx = _chain_graph()
    grid = (10, 10)
    w, x = ncut.scipy_second_eigenpair(ncut.published_affinity(feats[0], None, 0.15))
    rest = labels == 0
    spread = np.abs(x[rest] - np.sum(x) / len(x)).max()
    assert 0 < spread <= ncut.TIE_RTOL * np.abs(x).max()  # 92 ties, split by rounding only
    for solver in ("exact", "fast", "dense"):  # ours: the same mask from every solver
        assert _mask(ncut.maskcut_patches(feats, grid, 1, 0.15, solver=solver)) == a_idx

    def rounding(x):  # exact values, and one R patch next to A a rounding step above the mean
        a = np.abs(x[a_idx[0]])
        x = np.where(labels == 1, a, np.where(labels == 2, -a, 0.0))
        x[24] = 1e-18
        return x

    _force_eigenvector(monkeypatch, rounding)
    assert _mask(ncut.maskcut_patches(feats, grid, 1, 0.15, solver="exact")) == a_idx
    pub = ncut.maskcut_patches(feats, grid, 1, 0.15, compat="published")
    assert _mask(pub) == sorted(a_idx + [24])  # published: the tie above the mean joins A's component
    assert ncut.convention_events(pub.eigvecs[:, 0], grid)["mean_tie"].item()


# ------------------------------------------------------------------------------ ties at the seed
def test_seed_tie_pure_rule():
    grid = (4, 5)
    x = np.full(20, -0.1)
    x[6], x[13] = 1.0, np.nextafter(1.0, 2.0)  # equal up to one rounding step, not neighbours
    default, published = _both(x, grid)
    assert default == ([6, 13], 6)  # ours: the lowest index
    assert published == ([6, 13], 13)  # published: numpy's argmax of the rounded values
    assert ncut.convention_events(torch.tensor(x)[None], grid)["seed_tie"].item()
    fg = torch.zeros(1, 20, dtype=torch.bool)
    fg[0, [6, 13]] = True
    comp = [ncut.seed_component(fg, torch.tensor([s]), grid)[0].nonzero().flatten().tolist() for s in (6, 13)]
    assert comp == [[6], [13]]  # the seed picks the object


def test_seed_tie_through_the_solve(monkeypatch):
    h = w = 8
    first, second = [9, 10, 17, 18], [45, 46, 53, 54]  # two identical objects
    labels = np.zeros(h * w, int)
    labels[first + second] = 1
    feats = _cluster_features(labels, [[0.0, 1.0], [1.0, 0.0]])
    w_, x = ncut.scipy_second_eigenpair(ncut.published_affinity(feats[0], None, 0.15))
    obj = x[first + second]
    assert obj.max() - obj.min() <= ncut.TIE_RTOL * np.abs(x).max()  # 8 tied maxima (up to rounding)
    for solver in ("exact", "fast", "dense"):
        assert _mask(ncut.maskcut_patches(feats, (h, w), 1, 0.15, solver=solver)) == first

    def rounding(x):  # the second object one rounding step above the first
        x = x * np.sign(x[first[0]])
        x[first + second] = abs(x[first[0]])
        x[second] = np.nextafter(x[second], 1.0)
        return x

    _force_eigenvector(monkeypatch, rounding)
    assert _mask(ncut.maskcut_patches(feats, (h, w), 1, 0.15, solver="exact")) == first
    pub = ncut.maskcut_patches(feats, (h, w), 1, 0.15, compat="published")
    assert _mask(pub) == second
    assert ncut.convention_events(pub.eigvecs[:, 0], (h, w))["seed_tie"].item()


# ------------------------------------------------------------------------------ affinity dtypes
def test_published_affinity_is_float32_then_float64():
    # cos(f0, f1) is above tau in float64 and rounds onto tau in float32
    f = torch.tensor([[1.0, 0.0], [1.0, 6.591239929199219]], dtype=torch.float32)
    first = ncut.published_affinity(f, None, 0.15)
    later = ncut.published_affinity(f, torch.ones(2, dtype=torch.bool), 0.15)
    assert first[0, 1] == 1e-5 and later[0, 1] == 1.0
    assert not ncut.binary_graph(ncut.cosine_similarity(f[None]), 0.15).adj[0, 0, 1]  # ours: float32 throughout
    masked = ncut.published_affinity(f, torch.tensor([True, False]), 0.15)
    assert masked[1].tolist() == [1e-5, 1e-5] and masked[0, 0] == 1.0


def test_published_mode_uses_raw_lapack_vectors_and_no_gap_rule():
    feats = torch.ones(1, 16, 4)  # uniform image: every non-trivial eigenvalue is equal
    ours = ncut.maskcut_patches(feats, (4, 4), 2, 0.15, solver="exact")
    pub = ncut.maskcut_patches(feats, (4, 4), 2, 0.15, compat="published")
    assert (ours.status == ncut.EMPTY_DEGENERATE).all() and not ours.masks.any()
    w, x = ncut.scipy_second_eigenpair(ncut.published_affinity(feats[0], None, 0.15))
    np.testing.assert_array_equal(pub.eigvecs[0, 0].numpy(), x)  # LAPACK's vector, sign included
    np.testing.assert_array_equal(pub.eigvals[0, 0].numpy(), w)
    assert pub.masks[0, 0].any()  # published: a mask from whatever vector LAPACK returned
    assert ncut.convention_events(pub.eigvecs[:, 0], (4, 4), pub.eigvals[:, 0])["degenerate"].item()
    with pytest.raises(ValueError, match="maskcut.compat"):
        ncut.maskcut_patches(feats, (4, 4), 1, 0.15, compat="publish")


# ------------------------------------------------------------------------------ DINO's float32 forward
def _dino_forward_keys(vit, x):
    """Last-block keys by DINO's own attention formula ``softmax((q k^T) * scale) v``, step by step."""
    from cutler.maskcut.vit import interpolate_pos_embed

    b, _, hh, ww = x.shape
    p = vit.patch_embed.proj.kernel_size[0]
    t = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([vit.cls_token.expand(b, -1, -1), t], 1) + interpolate_pos_embed(vit.pos_embed, hh // p, ww // p)
    for blk in vit.blocks:
        n, c = t.shape[1], t.shape[2]
        heads = blk.attn.num_heads
        qkv = blk.attn.qkv(blk.norm1(t)).reshape(b, n, 3, heads, c // heads)
        if blk is vit.blocks[-1]:
            return qkv[:, 1:, 1].reshape(b, n - 1, c)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(dim=-1)
        t = t + blk.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        t = t + blk.mlp(blk.norm2(t))


def test_match_dino_forward_equals_dino_formula_bit_for_bit():
    from cutler.maskcut.vit import IMAGENET_MEAN, IMAGENET_STD, DinoFeatureExtractor

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        ext = DinoFeatureExtractor("small", 16, "k", amp_dtype="float32", match_dino=True)
    assert not any(blk.attn.fused_attn for blk in ext.vit.blocks)
    hwc = torch.randint(0, 256, (2, 96, 80, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ours = ext(hwc.permute(0, 3, 1, 2))  # channels-last, as the loader hands it over
    chw = hwc.permute(0, 3, 1, 2).contiguous().float() / 255.0
    chw = (chw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(ours, _dino_forward_keys(ext.vit, chw))
    ext.match_dino = False
    assert all(blk.attn.fused_attn for blk in ext.vit.blocks)


# ------------------------------------------------------------------------------ settings end to end
def test_compat_setting_in_the_model_and_an_early_error():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        model = pl.MaskCutModel(replace(TINY, compat="published", dtype="auto"))
    assert model.extractor.match_dino and model.extractor.amp_dtype == "float32"
    with pytest.raises(ValueError, match="maskcut.compat"):
        pl.MaskCutModel(replace(TINY, compat="publshed"))


def test_published_output_format_and_compat_run(tmp_path):
    from cutler.maskcut.cli import resolve_maskcut_config
    from cutler.maskcut.dataset import list_dataset

    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide.png": (120, 80), "tall.png": (70, 100)}.items():
        img = rng.integers(0, 50, (h, w, 3)).astype(np.uint8)
        img[h // 4:3 * h // 4, w // 4:3 * w // 4] = (230, 60, 30)
        Image.fromarray(img).save(tmp_path / name)
    cfg = resolve_maskcut_config(["--compat", "published", "--output-format", "published", "maskcut.n=2"])
    assert (cfg.compat, cfg.output_format, cfg.n) == ("published", "published", 2)
    records, _ = list_dataset(str(tmp_path))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        model = pl.MaskCutModel(replace(TINY, compat="published"))
    summary = pl.run_maskcut(model.cfg, records, str(tmp_path / "out"), progress=False, model=model)
    assert summary["compat"] == "published" and summary["processed"] == 2 and summary["annotations"] > 0
    paths = {}
    for fmt in ("default", "published"):
        paths[fmt] = tmp_path / f"{fmt}.json"
        merge_outputs(str(tmp_path / "out"), str(paths[fmt]), output_format=fmt)
    default, published = (json.loads(paths[f].read_text()) for f in ("default", "published"))
    sizes = {im["id"]: (im["width"], im["height"]) for im in published["images"]}
    assert sorted(sizes.values()) == [(70, 100), (120, 80)]  # width and height in the right order
    for d, p in zip(default["annotations"], published["annotations"]):
        assert "width" not in d and isinstance(d["area"], float)
        assert isinstance(p["area"], int) and p["area"] == d["area"]
        assert (p["width"], p["height"]) == sizes[p["image_id"]] == tuple(p["segmentation"]["size"][::-1])
        assert p["segmentation"] == d["segmentation"]
    assert len(COCO(str(paths["published"])).getAnnIds()) == len(published["annotations"])
    with pytest.raises(ValueError, match="maskcut.output_format"):
        merge_outputs(str(tmp_path / "out"), str(tmp_path / "x.json"), output_format="coco")
