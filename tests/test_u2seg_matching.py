"""U2Seg's many-to-one matching of cluster ids to categories, on hand-built cases, and the matched metrics."""
import math

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cutler.evaluation.coco_eval import evaluate_coco_detailed
from cutler.u2seg.evaluation import MATCH_PARAMS, evaluate_results, match_params, u2seg_table
from cutler.u2seg.matching import apply_mapping, evaluate_matched, match_clusters

CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "dog"}]


def _gt(anns, n_images=2, size=100):
    images = [{"id": i, "file_name": f"{i}.jpg", "height": size, "width": size} for i in range(1, n_images + 1)]
    out = []
    for k, (image_id, cat, box, *crowd) in enumerate(anns):
        out.append({"id": k + 1, "image_id": image_id, "category_id": cat, "bbox": list(box), "area": box[2] * box[3],
                    "iscrowd": crowd[0] if crowd else 0})
    return {"images": images, "annotations": out, "categories": CATS}


def _det(image_id, cluster, box, score):
    return {"image_id": image_id, "category_id": cluster, "bbox": list(box), "score": score}


def test_many_clusters_map_to_one_category_by_majority_vote():
    gt = _gt([(1, 1, (0, 0, 10, 10)), (1, 1, (50, 50, 10, 10)), (2, 3, (0, 0, 20, 20)), (2, 1, (60, 60, 10, 10))])
    dets = [_det(1, 11, (0, 0, 10, 10), 0.9), _det(1, 12, (50, 50, 10, 10), 0.9),   # two clusters of persons
            _det(2, 13, (0, 0, 20, 20), 0.9), _det(2, 13, (60, 60, 10, 10), 0.9),   # cluster 13: car once, person once
            _det(2, 13, (1, 1, 19, 19), 0.9)]                                          # ... and car again
    m = match_clusters(gt, dets, conf=0.5, iou=0.5)
    assert m.mapping == {11: 1, 12: 1, 13: 3}
    assert m.votes[13] == {3: 2, 1: 1} and m.kept == 5 and m.voting == 5
    assert m.as_json({1: "person", 3: "car"})["clusters"]["13"]["category"] == "car"


def test_confidence_threshold_keeps_scores_at_or_above_it():
    gt = _gt([(1, 1, (0, 0, 10, 10)), (1, 7, (40, 40, 10, 10))])
    dets = [_det(1, 5, (0, 0, 10, 10), 0.4), _det(1, 6, (40, 40, 10, 10), 0.39999)]
    m = match_clusters(gt, dets, conf=0.4, iou=0.5)
    assert m.mapping == {5: 1} and m.unmatched == [6] and m.kept == 1


def test_iou_must_be_strictly_above_the_threshold_and_every_passing_instance_votes():
    # det (0,0,10,10) vs gt (0,0,10,20): IoU exactly 0.5
    gt = _gt([(1, 7, (0, 0, 10, 20)), (1, 3, (0, 0, 10, 10)), (1, 1, (0, 0, 11, 10))])
    det = [_det(1, 9, (0, 0, 10, 10), 1.0)]
    m = match_clusters(gt, det, conf=0.0, iou=0.5)
    assert m.votes[9] == {3: 1, 1: 1}  # IoU 1 and 10/11 vote; exactly 0.5 does not
    assert m.mapping == {9: 1}  # 1-1 tie: the smaller category id
    assert match_clusters(gt, det, conf=0.0, iou=0.4999).votes[9] == {3: 1, 1: 1, 7: 1}


def test_ties_go_to_the_smallest_category_id_and_crowd_does_not_vote():
    gt = _gt([(1, 7, (0, 0, 10, 10)), (1, 3, (0, 0, 10, 10)), (1, 1, (0, 0, 10, 10), 1)])
    m = match_clusters(gt, [_det(1, 4, (0, 0, 10, 10), 0.9)], conf=0.1, iou=0.5)
    assert m.votes[4] == {7: 1, 3: 1} and m.mapping == {4: 3}


def test_mask_iou_votes_differ_from_box_iou():
    ring = np.zeros((100, 100), np.uint8)
    ring[20:80, 20:80] = 1
    ring[30:70, 30:70] = 0
    disc = np.zeros((100, 100), np.uint8)
    disc[30:70, 30:70] = 1  # the ring's hole: mask IoU 100 / 3600 with it, through the bump below
    disc[20:30, 45:55] = 1
    rle = lambda m: {k: (v.decode() if isinstance(v, bytes) else v) for k, v in mask_util.encode(np.asfortranarray(m)).items()}  # noqa: E731
    gt = _gt([(1, 1, (20, 20, 60, 60))])
    gt["annotations"][0]["segmentation"] = rle(ring)
    det = {**_det(1, 2, (20, 20, 60, 60), 0.9), "segmentation": rle(disc)}
    assert match_clusters(gt, [det], 0.5, 0.5, "bbox").mapping == {2: 1}
    assert match_clusters(gt, [det], 0.5, 0.5, "segm").mapping == {}
    with pytest.raises(ValueError, match="segmentation"):
        match_clusters(_gt([(1, 1, (0, 0, 5, 5))]), [_det(1, 2, (0, 0, 5, 5), 1.0)], 0.5, 0.5, "segm")


def test_unmatched_clusters_are_dropped_and_matched_metrics_follow():
    gt = _gt([(1, 1, (0, 0, 10, 10)), (2, 3, (0, 0, 20, 20))])
    dets = [_det(1, 11, (0, 0, 10, 10), 0.9), _det(2, 12, (0, 0, 20, 20), 0.8), _det(2, 99, (70, 70, 5, 5), 0.95)]
    assert apply_mapping(dets, {11: 1, 12: 3}) == [{**dets[0], "category_id": 1}, {**dets[1], "category_id": 3}]
    res = evaluate_matched(gt, dets, conf=0.5, iou=0.5)
    assert res["mapping"].unmatched == [99]
    assert res["matched"]["bbox"]["AP"] == pytest.approx(100.0)  # the dropped false positive costs nothing
    assert res["per_category"]["bbox"][1]["AP"] == pytest.approx(100.0)
    assert math.isnan(res["per_category"]["bbox"][7]["AP"])  # no ground truth
    assert res["agnostic"]["bbox"]["AP"] < 100.0  # class-agnostic: the confident stray detection is a false positive


def test_per_category_metrics_equal_pycocotools_run_by_hand():
    rng = np.random.default_rng(0)
    anns, dets = [], []
    for image_id in (1, 2, 3):
        for _ in range(4):
            x, y = rng.integers(0, 70, 2)
            box = (int(x), int(y), int(rng.integers(8, 30)), int(rng.integers(8, 30)))
            cat = int(rng.choice([1, 3, 7]))
            anns.append((image_id, cat, box))
            jitter = tuple(int(v) for v in np.asarray(box) + rng.integers(-3, 4, 4))
            dets.append({"image_id": image_id, "category_id": int(rng.choice([cat, cat, 1])),
                         "bbox": [jitter[0], jitter[1], max(jitter[2], 2), max(jitter[3], 2)],
                         "score": float(rng.uniform(0.1, 1))})
    gt = _gt(anns, n_images=3)
    summary, per_cat = evaluate_coco_detailed(gt, dets, ("bbox",), class_agnostic=False)
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    E = COCOeval(coco, coco.loadRes(dets), "bbox")
    E.evaluate()
    E.accumulate()
    E.summarize()
    assert summary["bbox"]["AP"] == pytest.approx(E.stats[0] * 100, abs=1e-9)
    assert summary["bbox"]["AR100"] == pytest.approx(E.stats[8] * 100, abs=1e-9)
    p = E.eval["precision"][:, :, :, 0, -1]
    for k, cat in enumerate(E.params.catIds):
        vals = p[:, :, k][p[:, :, k] > -1]
        assert per_cat["bbox"][cat]["AP"] == pytest.approx(vals.mean() * 100, abs=1e-9)


def test_published_thresholds_and_table(tmp_path):
    assert match_params({}, "COCO", 800) == (0.6, 0.4) and match_params({}, "VOC", 800) == (0.8, 0.2)
    assert match_params({}, "UVO", 800) == (0.4, 0.1) and MATCH_PARAMS[("COCO", 300)] == (0.6, 0.3)
    cfg = {"u2seg": {"match_iou": 0.7, "match_conf": -1.0}}
    assert match_params(cfg, "COCO", 800) == (0.7, 0.4)
    gt = _gt([(1, 1, (0, 0, 10, 10))])
    metrics = evaluate_results(gt, [_det(1, 5, (0, 0, 10, 10), 0.9)], tmp_path, 0.4, 0.6, name="toy")
    assert metrics["matched_bbox"]["AP"] == pytest.approx(100.0) and metrics["bbox"]["AP"] == pytest.approx(100.0)
    assert (tmp_path / "cluster_mapping.json").is_file() and "person" in (tmp_path / "per_category.md").read_text()
    header, rows = u2seg_table({"COCO": metrics}, 800)
    row = next(r for r in rows if r[:2] == ["COCO", "box AP"])
    assert row[2] == pytest.approx(100.0) and row[3] == 5.9 and row[4] == 7.3
    assert ["COCO class-agnostic", "box AP50"] == next(r for r in rows if r[0].endswith("agnostic"))[:2]
