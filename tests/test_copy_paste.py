"""Copy-paste: the spec's rules as invariants and hand-built cases."""
import pytest
import torch

from cutler.data.copy_paste import CopyPasteParams, copy_paste_batch, paste_instances
from cutler.structures.masks import masks_to_boxes




def _sample(h, w, rects, value):
    """An image filled with ``value`` and one rectangular instance per (y0, x0, y1, x1) in ``rects``."""
    img = torch.full((3, h, w), value, dtype=torch.uint8)
    masks = torch.zeros((len(rects), h, w), dtype=torch.bool)
    for i, (y0, x0, y1, x1) in enumerate(rects):
        masks[i, y0:y1, x0:x1] = True
        img[:, y0:y1, x0:x1] = value + 10 * (i + 1)
    return {"image": img, "height": h, "width": w,
            "instances": {"boxes": masks_to_boxes(masks), "classes": torch.zeros(len(rects), dtype=torch.int64),
                          "masks": masks}}


def _random_batch(gen, b=4):
    out = []
    for j in range(b):
        h, w = int(torch.randint(24, 40, (), generator=gen)), int(torch.randint(24, 40, (), generator=gen))
        n = int(torch.randint(0 if j == 1 else 1, 4, (), generator=gen))
        # Non-overlapping: instance i lives in horizontal band i.
        rects = []
        for i in range(n):
            y0 = i * (h // 3)
            x0 = int(torch.randint(0, w // 2, (), generator=gen))
            rects.append((y0, x0, y0 + int(torch.randint(2, h // 3, (), generator=gen)), x0 + int(torch.randint(2, w // 2, (), generator=gen))))
        out.append(_sample(h, w, rects, 20 * j))
    return out


def test_invariants_over_many_random_batches():
    gen = torch.Generator().manual_seed(0)
    params = CopyPasteParams(rate=1.0, min_ratio=0.3, max_ratio=1.0, random_num=True)
    changed = 0
    for trial in range(40):
        batch = _random_batch(gen)
        out = copy_paste_batch(batch, params, torch.Generator().manual_seed(trial))
        assert len(out) == len(batch)
        for src, o in zip(batch, out):
            inst = o["instances"]
            m = inst["masks"]
            assert o["image"].shape == src["image"].shape and m.shape[1:] == src["image"].shape[1:]
            assert m.shape[0] == inst["boxes"].shape[0] == inst["classes"].shape[0]
            assert torch.equal(inst["boxes"], masks_to_boxes(m))  # boxes are mask extents
            assert m.flatten(1).any(1).all()  # no empty instance
            # The sources' instances are disjoint and only the target's masks are cut: no two masks overlap.
            assert m.sum(0).max() <= 1
            if o is not src:
                changed += 1
                # The pasted pixels are the only changed pixels, and they lie in the image by construction:
                # all target pixels outside the union of new masks are untouched.
                outside = ~m.any(0)
                assert torch.equal(o["image"][:, outside], src["image"][:, outside])
            # Inputs are never modified in place.
        assert all(b["instances"]["masks"].sum(0).max() <= 1 for b in batch)
    assert changed > 60


def test_pairing_is_reverse_order_and_pasted_pixels_come_from_source():
    # Target 0 (value 0, no instance) receives from source 1 (value 100 background + 1 instance).
    t = _sample(20, 20, [], 0)
    s = _sample(20, 20, [(5, 5, 15, 15)], 100)  # instance pixels have value 110
    params = CopyPasteParams(rate=1.0, min_ratio=1.0, max_ratio=1.0, random_num=False)
    out = copy_paste_batch([t, s], params, torch.Generator().manual_seed(0))
    # r = 1 and the full size: the offset must be 0 and the instance lands where it was.
    assert torch.equal(out[0]["instances"]["masks"], s["instances"]["masks"])
    assert out[0]["instances"]["boxes"].tolist() == [[5.0, 5.0, 15.0, 15.0]]
    assert (out[0]["image"][:, 5:15, 5:15] == 110).all() and (out[0]["image"][:, :5] == 0).all()
    # Target 1 receives from target 0 which has no instance: unchanged object.
    assert out[1] is s


def test_occlusion_rule_uses_target_area_and_subtraction():
    params = CopyPasteParams(rate=1.0, min_ratio=1.0, max_ratio=1.0, random_num=False)
    # Pasted 10x10 square covers half of the small target (4 of 8 px): >= 50% of the TARGET -> dropped.
    tgt = _sample(20, 20, [(0, 0, 2, 4), (14, 14, 20, 20)], 0)
    src = _sample(20, 20, [(0, 2, 10, 12)], 50)
    out = paste_instances(tgt, src, params, torch.Generator().manual_seed(0))
    assert out is tgt
    # Covering 2 of 8 px (25%): kept, and the target mask loses exactly the covered pixels.
    src2 = _sample(20, 20, [(0, 3, 10, 13)], 50)
    out = paste_instances(tgt, src2, params, torch.Generator().manual_seed(0))
    m = out["instances"]["masks"]
    assert m.shape[0] == 3
    assert m[0].sum() == 6 and not m[0, 0:2, 3].any()  # column 3 moved to the pasted object
    assert out["instances"]["boxes"][0].tolist() == [0.0, 0.0, 3.0, 2.0]  # recomputed from the mask
    assert out["instances"]["boxes"][2].tolist() == [3.0, 0.0, 13.0, 10.0]
    # Each piece covering exactly 50% of the target is dropped (the rule is >=).
    tgt3 = _sample(20, 20, [(0, 0, 2, 4)], 0)
    src3 = _sample(20, 20, [(0, 0, 2, 2), (0, 2, 2, 4)], 50)
    assert paste_instances(tgt3, src3, params, torch.Generator().manual_seed(0)) is tgt3
    # A target can only vanish through several pasted pieces each below 50%: 9 px, 3 px (33%) per piece.
    tgt4 = _sample(20, 20, [(0, 0, 3, 3)], 0)
    src4 = _sample(20, 20, [(0, 0, 1, 3), (1, 0, 2, 3), (2, 0, 3, 3)], 50)
    out4 = paste_instances(tgt4, src4, params, torch.Generator().manual_seed(0))
    assert out4["instances"]["masks"].shape[0] == 3  # the target vanished, the 3 pasted rows remain
    assert torch.equal(out4["instances"]["masks"].any(0), tgt4["instances"]["masks"][0])


def test_overlapping_pasted_instances_keep_their_extent_and_cut_only_the_target():
    """As the published copy_and_paste: the union of the pasted masks is subtracted from the TARGET's
    masks only; pasted masks that overlap in the source overlap in the result, each with its full extent."""
    params = CopyPasteParams(rate=1.0, min_ratio=1.0, max_ratio=1.0, random_num=False)
    tgt = _sample(20, 20, [(12, 12, 20, 20)], 0)  # 64 px; the pasted union covers 9 of them (14%): kept
    src = _sample(20, 20, [(0, 0, 10, 10), (5, 5, 15, 15)], 100)  # overlap: rows/cols 5..9
    for seed in range(4):  # several chosen orders: the result must not depend on it
        out = paste_instances(tgt, src, params, torch.Generator().manual_seed(seed))
        inst = out["instances"]
        a = torch.zeros(20, 20, dtype=torch.bool)
        a[0:10, 0:10] = True
        b = torch.zeros(20, 20, dtype=torch.bool)
        b[5:15, 5:15] = True
        t = torch.zeros(20, 20, dtype=torch.bool)
        t[12:20, 12:20] = True
        t[12:15, 12:15] = False  # under pasted object b
        assert inst["masks"].shape == (3, 20, 20)
        assert torch.equal(inst["masks"][0], t)
        pasted = {tuple(bx): mk for bx, mk in zip(inst["boxes"][1:].tolist(), inst["masks"][1:])}
        assert set(pasted) == {(0.0, 0.0, 10.0, 10.0), (5.0, 5.0, 15.0, 15.0)}
        assert torch.equal(pasted[(0.0, 0.0, 10.0, 10.0)], a) and torch.equal(pasted[(5.0, 5.0, 15.0, 15.0)], b)
        assert inst["boxes"][0].tolist() == [12.0, 12.0, 20.0, 20.0]
        # Image: the source's pixels on the union (110 on a only, 120 where b was drawn), the target elsewhere.
        exp = tgt["image"].clone()
        exp[:, a | b] = src["image"][:, a | b]
        assert torch.equal(out["image"], exp)


def test_random_num_k_range_and_rate_zero():
    tgt = _sample(30, 30, [], 0)
    src = _sample(30, 30, [(0, 0, 3, 3), (10, 10, 13, 13), (20, 20, 23, 23), (0, 20, 3, 23)], 100)
    params = CopyPasteParams(rate=1.0, min_ratio=1.0, max_ratio=1.0, random_num=True)
    counts = {paste_instances(tgt, src, params, torch.Generator().manual_seed(s))["instances"]["masks"].shape[0]
              for s in range(60)}
    assert counts == {1, 2, 3}  # k ~ U{1, n-1} with n = 4: never all four
    one = _sample(30, 30, [(0, 0, 3, 3)], 100)
    assert paste_instances(tgt, one, params, torch.Generator().manual_seed(0))["instances"]["masks"].shape[0] == 1
    assert paste_instances(tgt, src, CopyPasteParams(rate=0.0), torch.Generator().manual_seed(0)) is tgt


def test_rescale_and_placement_inside_target():
    tgt = _sample(40, 60, [], 0)
    src = _sample(20, 20, [(0, 0, 20, 20)], 100)  # the instance is the whole source image
    params = CopyPasteParams(rate=1.0, min_ratio=0.5, max_ratio=0.5, random_num=False)
    for s in range(10):
        out = paste_instances(tgt, src, params, torch.Generator().manual_seed(s))
        x0, y0, x1, y1 = out["instances"]["boxes"][0].tolist()
        assert (x1 - x0, y1 - y0) == (30.0, 20.0)  # 0.5 * target size, not source size
        assert 0 <= x0 and x1 <= 60 and 0 <= y0 and y1 <= 40


def test_deterministic_given_seed():
    gen = torch.Generator().manual_seed(1)
    batch = _random_batch(gen)
    params = CopyPasteParams(rate=0.7, min_ratio=0.3, max_ratio=1.0)
    a = copy_paste_batch(batch, params, torch.Generator().manual_seed(9))
    b = copy_paste_batch(batch, params, torch.Generator().manual_seed(9))
    c = copy_paste_batch(batch, params, torch.Generator().manual_seed(10))
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["instances"]["masks"], y["instances"]["masks"])
    assert any(not torch.equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_rescale_truncates_the_size_and_grows_masks_like_the_published_bilinear():
    """Ratio 0.67 of a 10 px target: the paste window is int(6.7) = 6 px (round would give 7), and the 2x2 source
    mask at [2:4, 2:4] of a 10x10 source becomes the 2x2 block at window pixels [1:3, 1:3], where the bilinear
    value is > 0 (sample points 2.0 and 3.67); nearest would keep a single pixel. The offset of a 6 px window
    ranges over 0..4, that of a 7 px one over 0..3."""
    source = _sample(10, 10, [(2, 2, 4, 4)], 50)
    target = _sample(10, 10, [], 0)
    params = CopyPasteParams(rate=1.0, min_ratio=0.67, max_ratio=0.67, random_num=False)
    offsets = set()
    for seed in range(40):
        out = paste_instances(target, source, params, torch.Generator().manual_seed(seed))
        mask = out["instances"]["masks"][-1]
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert int(mask.sum()) == 4 and int(ys.max() - ys.min()) == 1 and int(xs.max() - xs.min()) == 1
        offsets.add(int(ys.min()) - 1)
        assert torch.equal((out["image"] != target["image"]).any(0), mask)  # only the object's pixels are painted
    assert offsets == {0, 1, 2, 3, 4}
