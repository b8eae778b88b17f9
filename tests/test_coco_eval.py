"""Class-agnostic COCO evaluation on constructed cases, checked against pycocotools run directly."""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cutler.evaluation.coco_eval import (
    METRIC_NAMES,
    EvaluationInputError,
    evaluate_coco,
    to_class_agnostic,
)
from cutler.evaluation.report import write_metrics_report

H, W = 200, 300


def _rle(box, h=H, w=W):
    m = np.zeros((h, w), dtype=np.uint8, order="F")
    x, y, bw, bh = (int(v) for v in box)
    m[y:y + bh, x:x + bw] = 1
    rle = mask_util.encode(m)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _gt(anns_per_image, categories=({"id": 1, "name": "a"},), masks=True):
    """anns_per_image: list (one per image) of lists of (box, category_id, iscrowd)."""
    images, anns = [], []
    for i, img_anns in enumerate(anns_per_image):
        images.append({"id": i + 1, "file_name": f"{i + 1}.jpg", "height": H, "width": W})
        for box, cat, crowd in img_anns:
            a = {"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": list(map(float, box)),
                 "area": float(box[2] * box[3]), "iscrowd": crowd}
            if masks:
                a["segmentation"] = _rle(box)
            anns.append(a)
    return {"images": images, "annotations": anns, "categories": [dict(c) for c in categories]}


def _det(image_id, box, score, mask=True, category_id=1):
    d = {"image_id": image_id, "category_id": category_id, "bbox": list(map(float, box)), "score": score}
    if mask:
        d["segmentation"] = _rle(box)
    return d


def _pycocotools(gt, dets, iou_type):
    """The 12 stats (in %) from pycocotools' own loadRes + summarize, on a single-category copy."""
    gt = copy.deepcopy(gt)
    for a in gt["annotations"]:
        a["category_id"] = 1
    gt["categories"] = [{"id": 1, "name": "object"}]
    dets = copy.deepcopy(dets)
    for d in dets:
        d["category_id"] = 1
        if iou_type == "segm":
            d.pop("bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        E = COCOeval(coco, coco.loadRes(dets), iou_type)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return {k: (v * 100 if v > -1 else math.nan) for k, v in zip(METRIC_NAMES, E.stats)}


def _assert_close(ours, ref):
    for k in METRIC_NAMES:
        if math.isnan(ref[k]):
            assert math.isnan(ours[k]), (k, ours[k])
        else:
            assert ours[k] == pytest.approx(ref[k], abs=1e-9), (k, ours[k], ref[k])


def test_perfect_predictions_give_ap_100_for_boxes_and_masks():
    boxes = [[10, 20, 60, 50], [150, 30, 100, 120]]  # medium and large
    gt = _gt([[(b, 1, 0) for b in boxes]])
    dets = [_det(1, b, 0.9 - 0.1 * i) for i, b in enumerate(boxes)]
    m = evaluate_coco(gt, dets)
    for t in ("bbox", "segm"):
        assert m[t]["AP"] == pytest.approx(100.0)
        assert m[t]["AP50"] == pytest.approx(100.0)
        assert m[t]["AR100"] == pytest.approx(100.0)
        assert math.isnan(m[t]["APs"])  # no small object in the ground truth
        _assert_close(m[t], _pycocotools(gt, dets, t))


def test_shifted_box_iou_two_thirds_passes_ap50_fails_ap75():
    # GT 100x100 at x=0; prediction shifted right by 20: IoU = 80*100 / (2*100*100 - 80*100) = 2/3.
    gt = _gt([[([0, 0, 100, 100], 1, 0)]], masks=False)
    dets = [_det(1, [20, 0, 100, 100], 0.8, mask=False)]
    m = evaluate_coco(gt, dets, iou_types=["bbox"])["bbox"]
    assert m["AP50"] == pytest.approx(100.0)
    assert m["AP75"] == pytest.approx(0.0)
    # thresholds 0.50, 0.55, 0.60, 0.65 pass (<= 2/3), the other 6 of 10 fail -> AP = 40
    assert m["AP"] == pytest.approx(40.0)
    _assert_close(m, _pycocotools(gt, dets, "bbox"))


def test_empty_predictions_give_zero_not_a_crash():
    gt = _gt([[([0, 0, 100, 100], 1, 0)], [([5, 5, 10, 10], 1, 0)]])
    m = evaluate_coco(gt, [])
    for t in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75", "APs", "APl", "AR1", "AR10", "AR100"):
            assert m[t][k] == 0.0, (t, k)
        assert math.isnan(m[t]["APm"])  # no medium object exists


def test_crowd_and_ignore_regions_are_neither_tp_nor_fp():
    obj, region = [0, 0, 80, 80], [150, 50, 120, 120]
    dets = [_det(1, region, 0.95), _det(1, obj, 0.9)]  # the top detection lies on the crowd region
    crowd = _gt([[(obj, 1, 0), (region, 1, 1)]])
    m = evaluate_coco(crowd, dets)
    assert m["bbox"]["AP"] == pytest.approx(100.0)
    _assert_close(m["bbox"], _pycocotools(crowd, dets, "bbox"))
    _assert_close(m["segm"], _pycocotools(crowd, dets, "segm"))

    ignore = _gt([[(obj, 1, 0), (region, 1, 0)]])
    ignore["annotations"][1]["ignore"] = 1
    assert evaluate_coco(ignore, dets)["bbox"]["AP"] == pytest.approx(100.0)

    # the same region as an ordinary object that nobody detected: AP drops, recall halves
    plain = _gt([[(obj, 1, 0), (region, 1, 0)]])
    dets_one = [_det(1, obj, 0.9)]
    m_plain = evaluate_coco(plain, dets_one)["bbox"]
    assert m_plain["AR100"] == pytest.approx(50.0)
    _assert_close(m_plain, _pycocotools(plain, dets_one, "bbox"))


def test_multi_category_ground_truth_is_collapsed_and_prediction_classes_ignored():
    cats = ({"id": 3, "name": "cat"}, {"id": 7, "name": "dog"})
    boxes = [[10, 10, 50, 50], [100, 40, 80, 90]]
    gt = _gt([[(boxes[0], 3, 0), (boxes[1], 7, 0)]], categories=cats)
    # predicted "classes" are wrong / arbitrary; class-agnostic evaluation must not care
    dets = [_det(1, boxes[0], 0.9, category_id=7), _det(1, boxes[1], 0.8, category_id=42)]
    m = evaluate_coco(gt, dets)
    assert m["bbox"]["AP"] == pytest.approx(100.0) and m["segm"]["AP"] == pytest.approx(100.0)
    agn = to_class_agnostic(gt)
    assert [c["id"] for c in agn["categories"]] == [1]
    assert {a["category_id"] for a in agn["annotations"]} == {1}
    assert gt["annotations"][0]["category_id"] == 3  # input untouched


def test_images_without_gt_and_random_case_match_pycocotools():
    rng = np.random.default_rng(0)
    per_image, dets = [], []
    for i in range(6):
        anns = []
        for _ in range(int(rng.integers(0 if i == 2 else 1, 5))):  # image 3 has no GT at all
            w, h = rng.integers(4, 120, size=2)
            x, y = rng.integers(0, W - w), rng.integers(0, H - h)
            anns.append(([int(x), int(y), int(w), int(h)], int(rng.integers(1, 3)), int(rng.random() < 0.1)))
        per_image.append(anns)
        for box, _, _ in anns + anns[:1]:
            jitter = rng.integers(-8, 9, size=4)
            b = [max(0, box[0] + jitter[0]), max(0, box[1] + jitter[1]), max(1, box[2] + jitter[2]),
                 max(1, box[3] + jitter[3])]
            b = [b[0], b[1], min(b[2], W - b[0]), min(b[3], H - b[1])]
            dets.append(_det(i + 1, b, float(rng.random())))
    dets.append(_det(3, [10, 10, 40, 40], 0.99))  # a false positive on the image without GT
    gt = _gt(per_image, categories=({"id": 1, "name": "a"}, {"id": 2, "name": "b"}))
    m = evaluate_coco(gt, dets)
    _assert_close(m["bbox"], _pycocotools(gt, dets, "bbox"))
    _assert_close(m["segm"], _pycocotools(gt, dets, "segm"))
    assert 0 < m["bbox"]["AP"] < 100


def test_max_dets_keeps_the_highest_scores():
    gt = _gt([[([0, 0, 50, 50], 1, 0)]], masks=False)
    dets = [_det(1, [200, 100, 30, 30], 0.9, mask=False), _det(1, [0, 0, 50, 50], 0.5, mask=False)]
    # with one detection allowed only the (wrong) top-scoring one survives
    m1 = evaluate_coco(gt, dets, iou_types=["bbox"], max_dets=1)["bbox"]
    assert m1["AP"] == 0.0 and m1["AR10"] == 0.0 and m1["AR100"] == 0.0
    m100 = evaluate_coco(gt, dets, iou_types=["bbox"])["bbox"]
    assert m100["AR100"] == pytest.approx(100.0) and m100["AR1"] == 0.0


def test_unknown_image_ids_raise_a_clear_error():
    gt = _gt([[([0, 0, 50, 50], 1, 0)]])
    with pytest.raises(EvaluationInputError, match="not in the ground truth"):
        evaluate_coco(gt, [_det(99, [0, 0, 50, 50], 0.9)])


def test_report_files_hold_the_same_numbers(tmp_path):
    gt = _gt([[([0, 0, 100, 100], 1, 0)]], masks=False)
    m = evaluate_coco(gt, [_det(1, [20, 0, 100, 100], 0.8, mask=False)], iou_types=["bbox"])
    text = write_metrics_report(tmp_path, "toy", m, extra={"num_images": 1})
    assert "AP50" in text and "100.0" in text and "40.0" in text
    data = json.loads((tmp_path / "metrics_toy.json").read_text())
    assert data["metrics"]["bbox"]["AP"] == pytest.approx(40.0)
    assert data["metrics"]["bbox"]["APs"] is None  # nan -> null in strict JSON
    rows = list(csv.DictReader(open(tmp_path / "metrics_toy.csv")))
    assert rows[0]["type"] == "bbox" and float(rows[0]["AP75"]) == 0.0 and rows[0]["APs"] == ""
    md = (tmp_path / "metrics_toy.md").read_text()
    assert "| bbox | 40.0 | 100.0 | 0.0 |" in md


# ------------------------------------------------------------------------------ pseudo-label quality
from cutler.evaluation.pseudo_labels import annotations_to_results, evaluate_pseudo_labels  # noqa: E402


def _pseudo_from(gt, id_offset=10, prefix="", drop=()):
    """The GT annotations as a pseudo-label file with other ids, another image order and path prefixes."""
    images = [{**im, "id": im["id"] + id_offset, "file_name": prefix + im["file_name"]} for im in reversed(gt["images"])]
    anns = [{"id": k + 1, "image_id": a["image_id"] + id_offset, "category_id": 1, "bbox": a["bbox"],
             "segmentation": a["segmentation"], "area": a["area"], "iscrowd": 0}
            for k, a in enumerate(gt["annotations"]) if a["id"] not in drop]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "fg"}]}


def test_pseudo_labels_matched_by_file_name_score_perfectly(tmp_path):
    gt = _gt([[([10, 10, 50, 40], 1, 0)], [([100, 50, 80, 60], 2, 0), ([5, 5, 20, 20], 1, 0)], []],
             categories=({"id": 1, "name": "a"}, {"id": 2, "name": "b"}))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(_pseudo_from(gt, prefix="val2017/")))
    out = evaluate_pseudo_labels(tmp_path / "pred.json", tmp_path / "gt.json", with_corloc=True)
    assert out["metrics"]["bbox"]["AP"] == pytest.approx(100.0) and out["metrics"]["segm"]["AP"] == pytest.approx(100.0)
    assert out["info"]["matched_images"] == 3 and out["info"]["gt_images_without_labels"] == 0
    assert out["corloc"]["corloc"] == pytest.approx(100.0) and out["corloc"]["num_images"] == 2
    assert {r["image_id"] for r in out["results"]} == {1, 2}  # ground-truth ids, not the file's
    # with ids as they are nothing matches: a clear error, or everything dropped on request
    with pytest.raises(EvaluationInputError, match="not in the ground truth"):
        evaluate_pseudo_labels(tmp_path / "pred.json", gt, match="id")
    dropped = evaluate_pseudo_labels(tmp_path / "pred.json", gt, match="id", allow_unmatched=True)
    assert dropped["metrics"]["bbox"]["AP"] == 0.0 and dropped["info"]["unmatched_images"] == 3


def test_pseudo_label_score_modes_and_missed_objects_match_pycocotools():
    gt = _gt([[([10, 10, 50, 40], 1, 0), ([200, 100, 30, 30], 1, 0)], [([100, 50, 80, 60], 1, 0)]])
    pred = _pseudo_from(gt, id_offset=0, drop=(2,))  # one object missed
    # a small false pseudo-mask (no GT there), written first in image 1
    fp = {"id": 50, "image_id": 1, "category_id": 1, "bbox": [150.0, 10.0, 10.0, 10.0],
          "segmentation": _rle([150, 10, 10, 10]), "area": 100.0, "iscrowd": 0}
    pred["annotations"].insert(0, fp)
    for mode in ("constant", "area"):
        results, _ = annotations_to_results(pred, gt, score_mode=mode)
        ours = evaluate_coco(gt, results)
        for t in ("bbox", "segm"):
            _assert_close(ours[t], _pycocotools(gt, results, t))
            assert ours[t]["AR100"] == pytest.approx(100 * 2 / 3)
    area_results, _ = annotations_to_results(pred, gt, score_mode="area")
    assert area_results[0]["score"] == pytest.approx(100 / (H * W))  # area / image area
    const = evaluate_pseudo_labels(pred, gt)["metrics"]["bbox"]["AP"]
    by_area = evaluate_pseudo_labels(pred, gt, score_mode="area")["metrics"]["bbox"]["AP"]
    # constant scores keep file order (the false mask ranks first); by area it ranks last
    assert by_area > const
    with pytest.raises(EvaluationInputError, match="score"):
        annotations_to_results(pred, gt, score_mode="field")


def test_pseudo_masks_at_another_resolution_are_resized():
    gt = _gt([[([20, 40, 100, 60], 1, 0)]])
    half = np.zeros((H // 2, W // 2), np.uint8, order="F")
    half[20:50, 10:60] = 1
    rle = mask_util.encode(half)
    rle["counts"] = rle["counts"].decode()
    pred = {"images": [{"id": 1, "file_name": "1.jpg", "height": H // 2, "width": W // 2}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [10, 20, 50, 30], "segmentation": rle}]}
    out = evaluate_pseudo_labels(pred, gt)
    assert out["info"]["resized_masks"] == 1
    assert out["results"][0]["bbox"] == pytest.approx([20.0, 40.0, 100.0, 60.0])
    assert out["metrics"]["segm"]["AP"] == pytest.approx(100.0)


def test_eval_pseudo_labels_tool_on_a_catalog_dataset(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from cutler.data.catalog import register_dataset

    gt = _gt([[([10, 10, 50, 40], 1, 0)], [([100, 50, 80, 60], 1, 0)]])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "images").mkdir()
    register_dataset("test_pseudo_gt", "images", "gt.json", overwrite=True)
    (tmp_path / "pred.json").write_text(json.dumps(_pseudo_from(gt, drop=(2,))))
    spec = importlib.util.spec_from_file_location(
        "eval_pseudo_labels", Path(__file__).resolve().parents[1] / "tools" / "eval_pseudo_labels.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tool.main(["--pred", str(tmp_path / "pred.json"), "--dataset", "test_pseudo_gt", "--root", str(tmp_path),
                     "--score", "area", "--corloc", "--output", str(tmp_path / "report")])
    printed = capsys.readouterr().out
    assert out["metrics"]["bbox"]["AR100"] == pytest.approx(50.0) and "CorLoc: 50.0% (1/2 images)" in printed
    saved = json.loads((tmp_path / "report" / "metrics_pseudo_labels_test_pseudo_gt.json").read_text())
    assert saved["metrics"]["segm"]["AP"] == pytest.approx(out["metrics"]["segm"]["AP"])
    assert saved["score_mode"] == "area" and saved["info"]["matched_images"] == 2


def test_ground_truth_without_ids_areas_or_boxes_is_completed():
    gt = _gt([[([10, 20, 30, 40], 1, 0), ([100, 50, 20, 10], 1, 0)]])
    for a in gt["annotations"]:
        a["id"] = 7  # duplicated ids
        a.pop("area")
    gt["annotations"][1].pop("bbox")  # only the mask is given
    agn = to_class_agnostic(gt)
    assert [a["id"] for a in agn["annotations"]] == [1, 2]
    assert [a["area"] for a in agn["annotations"]] == [1200.0, 200.0]  # mask areas
    assert agn["annotations"][1]["bbox"] == [100.0, 50.0, 20.0, 10.0]
    dets = [_det(1, [10, 20, 30, 40], 0.9), _det(1, [100, 50, 20, 10], 0.8)]
    assert evaluate_coco(gt, dets)["segm"]["AP"] == pytest.approx(100.0)
