"""CorLoc on constructed single-object-discovery cases."""
from __future__ import annotations

import json

import pytest

from cutler.evaluation.coco_eval import EvaluationInputError
from cutler.evaluation.corloc import corloc


def _gt():
    boxes = {1: [[0, 0, 100, 100]], 2: [[0, 0, 100, 100], [200, 0, 50, 50]], 3: [[0, 0, 100, 100], [200, 0, 50, 50]],
             4: [[10, 10, 20, 20]], 5: []}
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 300, "width": 300} for i in boxes]
    anns = [{"id": k, "image_id": i, "category_id": 1 + k % 3, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, b) in enumerate(((i, b) for i, bs in boxes.items() for b in bs), start=1)]
    anns.append({"id": 99, "image_id": 5, "category_id": 1, "bbox": [0, 0, 300, 300], "area": 9e4, "iscrowd": 1})
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}


def _r(image_id, box, score):
    return {"image_id": image_id, "bbox": box, "score": score, "category_id": 1}


def test_corloc_counts_only_the_top_box_with_strict_iou():
    results = [
        _r(1, [5, 0, 100, 100], 0.9),  # IoU 95/105 > 0.5: correct
        _r(2, [0, 0, 100, 50], 0.8),  # top box has IoU exactly 0.5: not correct (strictly greater needed) ...
        _r(2, [0, 0, 100, 100], 0.7),  # ... even though a lower-scored box is perfect
        _r(3, [10, 0, 100, 100], 0.2),
        _r(3, [200, 0, 50, 50], 0.6),  # top box matches the second GT object: correct
        # image 4 has no prediction: a failure
        _r(5, [0, 0, 10, 10], 0.9),  # image 5 has only a crowd region: not counted
    ]
    out = corloc(_gt(), results)
    assert out == {"corloc": 50.0, "num_images": 4, "num_correct": 2, "num_without_prediction": 1}
    # a lower threshold accepts the IoU-0.5 top box of image 2
    assert corloc(_gt(), results, iou_thresh=0.49)["num_correct"] == 3


def test_corloc_reads_files_and_rejects_unknown_images(tmp_path):
    (tmp_path / "gt.json").write_text(json.dumps(_gt()))
    (tmp_path / "res.json").write_text(json.dumps([_r(1, [0, 0, 100, 100], 1.0)]))
    assert corloc(tmp_path / "gt.json", tmp_path / "res.json")["corloc"] == pytest.approx(25.0)
    with pytest.raises(EvaluationInputError):
        corloc(_gt(), [_r(42, [0, 0, 1, 1], 1.0)])
