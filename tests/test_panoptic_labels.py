"""Panoptic pseudo-labels and metrics: the things-then-stuff merge, the COCO panoptic PNG/JSON round trip,
semantic targets, PQ against hand-computed values and torchmetrics, Hungarian PixelAcc / mIoU."""
import itertools
import json

import cv2
import numpy as np
import pytest
import torch

from cutler.u2seg.panoptic import (id_to_rgb, merge_things_and_stuff, panoptic_categories, panoptic_to_semantic,
                                   read_panoptic_png, rgb_to_id, segments_from_ids, write_panoptic_png)
from cutler.u2seg.panoptic_eval import (PanopticQuality, confusion_matrix, hungarian_semantic_metrics,
                                        relabel_segments)


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_merge_things_first_then_stuff_else_void():
    h, w = 8, 10
    stuff = np.zeros((h, w), np.int64)
    stuff[:4] = 1  # "sky" on top
    stuff[4:, :5] = 2  # "ground" bottom-left; bottom-right stays 0 (no stuff label)
    big = _rect(h, w, 2, 6, 2, 8)  # 24 px, cluster 3
    small = _rect(h, w, 3, 5, 3, 5)  # 4 px inside big, cluster 7: painted on top
    hidden = _rect(h, w, 3, 5, 3, 5)  # identical to small but listed first: fully covered -> dropped
    ids, segs = merge_things_and_stuff(np.stack([hidden, big, small]), [5, 3, 7], stuff, num_things=10)
    cats = {s["id"]: s["category_id"] for s in segs}
    assert [s["category_id"] for s in segs] == [3, 7, 11, 12]  # things (big, small), then stuff 10+1, 10+2
    expected = np.zeros((h, w), np.int64)
    expected[stuff == 1] = 3
    expected[stuff == 2] = 4
    expected[big] = 1
    expected[small] = 2
    assert np.array_equal(ids, expected)
    assert {s["id"]: s["area"] for s in segs} == {i: int((expected == i).sum()) for i in cats}
    assert segs[1]["bbox"] == [3, 3, 2, 2]
    assert (ids[4:, 5:][~big[4:, 5:]] == 0).all()  # no thing, stuff label 0: void
    # the published variant voids a stuff cluster mostly under things
    covered = np.zeros((h, w), np.int64)
    covered[2:6, 2:8] = 1
    covered[0, 0] = 1  # 1 of 25 pixels free: 96% under things
    _, segs2 = merge_things_and_stuff(big[None], [3], covered, num_things=10, max_stuff_thing_overlap=0.7)
    assert [s["category_id"] for s in segs2] == [3]
    _, segs3 = merge_things_and_stuff(big[None], [3], covered, num_things=10)
    assert [s["category_id"] for s in segs3] == [3, 11]
    with pytest.raises(ValueError, match="outside"):
        merge_things_and_stuff(big[None], [11], stuff, num_things=10)


def test_panoptic_png_json_round_trip_reads_with_standard_tools(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.choice([0, 1, 2, 300, 70000, 256 ** 3 - 1], size=(13, 17))
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)
    path = tmp_path / "pan" / "img.png"
    write_panoptic_png(path, ids)
    assert np.array_equal(read_panoptic_png(path), ids)
    # an independent reader (OpenCV, BGR order) and the COCO formula id = R + 256 G + 256^2 B
    bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.int64)
    assert np.array_equal(bgr[..., 2] + 256 * bgr[..., 1] + 65536 * bgr[..., 0], ids)
    cats = {1: 1, 2: 2, 300: 3, 70000: 4, 256 ** 3 - 1: 5}
    segs = segments_from_ids(ids, cats)
    doc = {"images": [{"id": 1, "file_name": "img.jpg", "height": 13, "width": 17}],
           "annotations": [{"image_id": 1, "file_name": "img.png", "segments_info": segs}],
           "categories": panoptic_categories(3, 2)}
    (tmp_path / "pan.json").write_text(json.dumps(doc))
    back = json.loads((tmp_path / "pan.json").read_text())
    for s in back["annotations"][0]["segments_info"]:
        m = ids == s["id"]
        ys, xs = np.nonzero(m)
        assert s["area"] == m.sum() and s["iscrowd"] == 0
        assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert [c["isthing"] for c in back["categories"]] == [1, 1, 1, 0, 0]


def test_semantic_target_things_zero_stuff_contiguous_void_255():
    cats = panoptic_categories(3, 2)  # things 1..3, stuff 4, 5
    ids = np.array([[0, 1, 2], [3, 4, 4]])
    segs = [{"id": 1, "category_id": 2}, {"id": 2, "category_id": 5}, {"id": 3, "category_id": 4},
            {"id": 4, "category_id": 1, "iscrowd": 1}]
    assert panoptic_to_semantic(ids, segs, cats).tolist() == [[255, 0, 2], [1, 255, 255]]


def _pq_reference_case():
    """Ground truth: background stuff G (cat 7), thing A (cat 1, 20 px), thing B (cat 1, 6 px), a crowd region
    (cat 1), stuff S (cat 5), two void strips. Prediction: a good match of A, a shifted miss of B, segments on
    void and on crowd (neither counts as a false positive), S with 2 pixels on void, a stuff false positive."""
    h, w = 10, 12
    gt = np.full((h, w), 7, np.int64)
    gt[0:4, 0:5] = 1  # A: 20 px
    gt[6:8, 0:3] = 2  # B: 6 px
    gt[0:3, 8:12] = 9  # crowd: 12 px
    gt[5:10, 5:12] = 5  # S: 35 px
    gt[9, 0:5] = 0  # void
    gt[4, 5:12] = 0  # void
    gt_segs = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}, {"id": 9, "category_id": 1, "iscrowd": 1},
               {"id": 5, "category_id": 5}, {"id": 7, "category_id": 7}]
    pred = np.zeros((h, w), np.int64)
    pred[0:4, 0:4] = 10  # 16 px inside A: IoU 0.8
    pred[7:9, 1:4] = 11  # 2 px on B, 4 on G: IoU 2 / 10 -> B is a FN, this a FP
    pred[4, 6:9] = 13  # all on void: not a FP
    pred[0:3, 9:12] = 14  # all on crowd of its category: not a FP
    pred[5:10, 6:12] = 20  # 30 px inside S ...
    pred[9, 3:5] = 20  # ... + 2 px on void, left out of the union: IoU 30 / 35
    pred[2:4, 5:8] = 15  # 6 px on G: a stuff FP of category 5
    pred_segs = [{"id": 10, "category_id": 1}, {"id": 11, "category_id": 1}, {"id": 13, "category_id": 1},
                 {"id": 14, "category_id": 1}, {"id": 20, "category_id": 5}, {"id": 15, "category_id": 5}]
    return gt, gt_segs, pred, pred_segs


def test_pq_hand_computed():
    gt, gt_segs, pred, pred_segs = _pq_reference_case()
    pq = PanopticQuality([{"id": 1, "isthing": 1}, {"id": 5, "isthing": 0}, {"id": 7, "isthing": 0},
                          {"id": 8, "isthing": 0}])
    pq.update(gt, gt_segs, pred, pred_segs)
    per = pq.per_category()
    assert (per[1]["tp"], per[1]["fp"], per[1]["fn"]) == (1, 1, 1)
    assert per[1]["sq"] == pytest.approx(0.8) and per[1]["pq"] == pytest.approx(0.8 / 2)
    assert (per[5]["tp"], per[5]["fp"], per[5]["fn"]) == (1, 1, 0) and per[5]["pq"] == pytest.approx(30 / 35 / 1.5)
    assert (per[7]["tp"], per[7]["fp"], per[7]["fn"]) == (0, 0, 1)
    res = pq.compute()  # category 8 never occurs: not averaged
    assert res["All"]["n"] == 3 and res["All"]["pq"] == pytest.approx((0.4 + 30 / 35 / 1.5) / 3)
    assert res["Things"]["rq"] == pytest.approx(0.5) and res["Stuff"]["sq"] == pytest.approx(30 / 35 / 2)
    with pytest.raises(KeyError, match="category 3"):
        pq.update(gt, gt_segs, pred, pred_segs[:-1] + [{"id": 15, "category_id": 3}])
    with pytest.raises(ValueError, match="not in segments_info"):
        pq.update(gt, gt_segs, pred, pred_segs[:-1])


def _to_pairs(ids, segs, stuff):
    cat = np.zeros_like(ids)
    inst = np.zeros_like(ids)
    for s in segs:
        m = ids == s["id"]
        cat[m] = s["category_id"]
        inst[m] = 0 if s["category_id"] in stuff else s["id"]
    cat[ids == 0] = 99  # unknown category: void for torchmetrics
    return torch.from_numpy(np.stack([cat, inst], -1))


def test_pq_matches_torchmetrics_on_random_scenes():
    """Predictions label every pixel here: torchmetrics also removes from the union the ground-truth pixels a
    prediction leaves unlabelled, which panopticapi (and cutler) keep."""
    from torchmetrics.detection import PanopticQuality as TMPanopticQuality

    things, stuff = [1, 2, 3], [4, 5]
    rng = np.random.default_rng(1)
    ours = PanopticQuality([{"id": c, "isthing": int(c in things)} for c in things + stuff])
    tm = TMPanopticQuality(things=set(things), stuffs=set(stuff), return_sq_and_rq=True, allow_unknown_preds_category=True)
    for _ in range(4):
        maps = []
        for is_pred in (False, True):  # ground truth, then prediction: stuff halves, then rectangles of things
            ids = np.zeros((16, 20), np.int64)
            segs = []
            split = int(rng.integers(5, 11))
            for k, (sl, c) in enumerate([(np.s_[:split], 4), (np.s_[split:], 5)]):
                ids[sl] = 100 + k
                segs.append({"id": 100 + k, "category_id": c})
            for k in range(int(rng.integers(1, 5))):
                y, x = int(rng.integers(0, 12)), int(rng.integers(0, 15))
                ids[y:y + int(rng.integers(3, 6)), x:x + int(rng.integers(3, 7))] = k + 1
                segs.append({"id": k + 1, "category_id": int(rng.choice(things))})
            if not is_pred:
                ids[rng.random(ids.shape) < 0.05] = 0
            present = set(np.unique(ids).tolist())
            maps.append((ids, [s for s in segs if s["id"] in present]))
        (gt, gs), (pr, ps) = maps
        ours.update(gt, gs, pr, ps)
        tm.update(_to_pairs(pr, ps, stuff)[None], _to_pairs(gt, gs, stuff)[None])
    res = ours.compute()["All"]
    expected = tm.compute().tolist()
    assert [res["pq"], res["sq"], res["rq"]] == pytest.approx(expected, abs=1e-6)
    assert res["pq"] > 0.05  # the scenes produce matches, so the comparison means something


def test_hungarian_miou_against_brute_force():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(40, 50))
    gt[0] = 255
    pred = (gt + rng.integers(0, 2, size=gt.shape) * rng.integers(0, 5, size=gt.shape)) % 5  # 5 clusters, noisy
    conf = confusion_matrix(pred, gt, 5, 4)
    assert conf.sum() == (gt != 255).sum()
    res = hungarian_semantic_metrics(conf)
    best = None
    for perm in itertools.permutations(range(5), 4):  # cluster perm[c] -> class c
        mapped = np.full(gt.shape, -1)
        for c, k in enumerate(perm):
            mapped[pred == k] = c
        valid = gt != 255
        acc = (mapped[valid] == gt[valid]).mean()
        ious = [((mapped == c) & (gt == c) & valid).sum() / (((mapped == c) | (gt == c)) & valid).sum() for c in range(4)]
        if best is None or acc > best[0]:
            best = (acc, np.mean(ious))
    assert res["PixelAcc"] == pytest.approx(100 * best[0]) and res["mIoU"] == pytest.approx(100 * best[1])
    # hand-computed: 2 clusters, 2 classes, swapped labels
    r = hungarian_semantic_metrics(np.array([[1, 8], [6, 0]]))
    assert r["mapping"] == {0: 1, 1: 0} and r["PixelAcc"] == pytest.approx(100 * 14 / 15)
    assert r["mIoU"] == pytest.approx(100 * (6 / 7 + 8 / 9) / 2)


def test_relabel_segments_voids_unmatched_and_merges_stuff():
    ids = np.array([[1, 2, 3, 4]])
    segs = [{"id": 1, "category_id": 10, "isthing": True}, {"id": 2, "category_id": 11, "isthing": True},
            {"id": 3, "category_id": 20, "isthing": False}, {"id": 4, "category_id": 21, "isthing": False}]
    out, info = relabel_segments(ids, segs, {10: 1, 20: 5, 21: 5})
    assert out.tolist() == [[1, 0, 3, 3]]
    assert [(s["id"], s["category_id"]) for s in info] == [(1, 1), (3, 5)]


def test_coco_panoptic_converter_merges_stuff_supercategories(tmp_path):
    from cutler.u2seg.converters import convert_coco_panoptic

    cats = [{"id": 1, "name": "person", "supercategory": "person", "isthing": 1},
            {"id": 2, "name": "bicycle", "supercategory": "vehicle", "isthing": 1},
            {"id": 92, "name": "banner", "supercategory": "textile", "isthing": 0},
            {"id": 141, "name": "pillow", "supercategory": "textile", "isthing": 0},
            {"id": 187, "name": "sky-other-merged", "supercategory": "sky", "isthing": 0}]
    ids = np.zeros((6, 8), np.int64)
    ids[:2] = 11  # banner
    ids[2:4, :4] = 12  # pillow: same supercategory as the banner -> merged with it
    ids[2:4, 4:] = 13  # sky
    ids[4:, :3] = 14  # person
    ids[4:, 3:6] = 15  # crowd of bicycles
    write_panoptic_png(tmp_path / "in" / "a.png", ids)
    segs = [{"id": 11, "category_id": 92}, {"id": 12, "category_id": 141}, {"id": 13, "category_id": 187},
            {"id": 14, "category_id": 1}, {"id": 15, "category_id": 2, "iscrowd": 1}]
    (tmp_path / "in.json").write_text(json.dumps({"images": [{"id": 7, "file_name": "a.jpg", "height": 6, "width": 8}],
                                                  "annotations": [{"image_id": 7, "file_name": "a.png", "segments_info": segs}],
                                                  "categories": cats}))
    counts = convert_coco_panoptic(tmp_path / "in.json", tmp_path / "in", tmp_path / "out.json", tmp_path / "out",
                                   tmp_path / "sem")
    assert counts == {"images": 1, "segments": 4, "things": 2, "stuff": 2}
    out = json.loads((tmp_path / "out.json").read_text())
    assert [(c["id"], c["name"]) for c in out["categories"] if not c["isthing"]] == [(201, "textile"), (202, "sky")]
    info = {s["id"]: s for s in out["annotations"][0]["segments_info"]}
    assert info[11]["category_id"] == 201 and info[11]["area"] == 24 and 12 not in info
    assert info[15]["iscrowd"] == 1 and info[14]["category_id"] == 1
    merged = read_panoptic_png(tmp_path / "out" / "a.png")
    assert (merged[:4, :4] == 11).all() and (merged[2:4, 4:] == 13).all()
    sem = cv2.imread(str(tmp_path / "sem" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert sem[0, 0] == 2 and sem[3, 5] == 3 and sem[5, 0] == 0 and sem[5, 4] == 255  # person 0, vehicle 1, stuff 2, 3


def test_cityscapes_converter_uses_cityscapesscripts(tmp_path):
    from cutler.u2seg.converters import convert_cityscapes_panoptic

    city = tmp_path / "gtFine" / "val" / "aachen"
    city.mkdir(parents=True)
    inst = np.full((4, 6), 7, np.int32)  # road (label id 7, stuff)
    inst[:2, :3] = 26001  # car instance 1 (label id 26)
    inst[2:, 4:] = 23  # sky
    cv2.imwrite(str(city / "aachen_000000_000019_gtFine_instanceIds.png"), inst.astype(np.uint16))
    counts = convert_cityscapes_panoptic(tmp_path, tmp_path / "cs.json", tmp_path / "cs")
    assert counts["images"] == 1 and (counts["things"], counts["stuff"]) == (8, 11)
    data = json.loads((tmp_path / "cs.json").read_text())
    assert data["images"][0]["id"] == 1 and data["images"][0]["file_name"] == "aachen/aachen_000000_000019_leftImg8bit.png"
    seg = data["annotations"][0]
    ids = read_panoptic_png(tmp_path / "cs" / seg["file_name"])
    cats = {s["id"]: s["category_id"] for s in seg["segments_info"]}
    assert cats[int(ids[0, 0])] == 26 and cats[int(ids[3, 0])] == 7 and cats[int(ids[3, 5])] == 23


def test_copy_paste_marks_pasted_pixels_as_things_in_the_semantic_target():
    from cutler.data.copy_paste import CopyPasteParams, paste_instances

    h, w = 20, 24
    src_mask = torch.zeros(1, h, w, dtype=torch.bool)
    src_mask[0, 2:10, 3:12] = True
    source = {"image": torch.full((3, h, w), 200, dtype=torch.uint8),
              "instances": {"boxes": torch.tensor([[3.0, 2.0, 12.0, 10.0]]), "classes": torch.tensor([4]),
                            "masks": src_mask}}
    target = {"image": torch.zeros((3, h, w), dtype=torch.uint8), "sem_seg": torch.full((h, w), 2, dtype=torch.uint8),
              "instances": {"boxes": torch.zeros(0, 4), "classes": torch.zeros(0, dtype=torch.int64),
                            "masks": torch.zeros(0, h, w, dtype=torch.bool)}}
    out = paste_instances(target, source, CopyPasteParams(1.0, 0.5, 0.5, False), torch.Generator().manual_seed(0))
    pasted = out["instances"]["masks"].any(0)
    assert pasted.any() and torch.equal(out["sem_seg"] == 0, pasted)
    assert (target["sem_seg"] == 2).all()  # the input is not modified
