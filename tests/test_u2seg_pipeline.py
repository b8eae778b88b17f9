"""The U2Seg loop end to end on a tiny synthetic set: MaskCut -> embeddings -> K-means -> class-aware round 0 ->
one self-training round keeping cluster ids -> matched and class-agnostic evaluation, then a resume; and the
merge and inference pieces it relies on."""
import json

import pytest
import torch
from pycocotools.coco import COCO

from cutler.evaluation.inference import ChunkWriter, instances_to_coco_results, plan_inference, predict_batch
from cutler.pipeline.cli import main
from cutler.selftrain.merge import merge_self_training_labels
from cutler.u2seg.cli import cluster_main, eval_main

from test_pipeline_e2e import TINY

U2SEG_TINY = TINY + ["u2seg.num_clusters=3", "u2seg.crop_size=32", "u2seg.match_conf=0.0", "u2seg.match_iou=0.3"]


def test_tiny_u2seg_pipeline_end_to_end(tmp_path, capsys):
    run = ["--config-file", "pipeline/u2seg_embedded.yaml", f"pipeline.run_dir={tmp_path / 'run'}"] + U2SEG_TINY
    data = main(run)
    assert data["plan"] == ["data", "maskcut", "embed", "cluster", "train_r0", "eval_r0", "predict_r0", "merge_r1",
                            "train_r1", "eval_r1", "report"]
    stages = data["stages"]
    assert all(stages[s]["status"] == "done" for s in data["plan"])
    masks = COCO(str(tmp_path / "run" / "labels" / "maskcut.json"))
    labels0 = COCO(str(tmp_path / "run" / "labels" / "round0.json"))
    # Every MaskCut mask got a cluster id in 1..3 and kept its mask.
    assert labels0.getCatIds() == [1, 2, 3] and len(labels0.anns) == len(masks.anns) == stages["cluster"]["metrics"]["pseudo_masks"]
    assert {a["category_id"] for a in labels0.anns.values()} <= {1, 2, 3}
    assert [a["segmentation"] for a in labels0.anns.values()] == [a["segmentation"] for a in masks.anns.values()]
    assert stages["embed"]["metrics"]["instances"] == len(masks.anns)
    # Class-aware detector: 3 classes + background in every cascade stage.
    sd = torch.load(tmp_path / "run" / "round0" / "train" / "model_final.pth", map_location="cpu", weights_only=True)
    sd = sd.get("model", sd)
    assert sd["roi_heads.box_predictor.2.cls_score.weight"].shape[0] == 4
    assert sd["roi_heads.box_predictor.2.bbox_pred.weight"].shape[0] == 4  # class-agnostic regression
    preds = json.loads((tmp_path / "run" / "round0" / "predict" / "coco_instances_results.json").read_text())
    assert preds and {p["category_id"] for p in preds} <= {1, 2, 3}
    labels1 = json.loads((tmp_path / "run" / "labels" / "round1.json").read_text())
    assert [c["id"] for c in labels1["categories"]] == [1, 2, 3]
    assert {a["category_id"] for a in labels1["annotations"]} <= {1, 2, 3}
    for r in (0, 1):
        metrics = json.loads((tmp_path / "run" / f"round{r}" / "eval" / "metrics.json").read_text())["synthetic_shapes_val"]
        assert {"bbox", "matched_bbox", "segm", "matched_segm"} <= set(metrics)
        assert all(0.0 <= metrics[t]["AP"] <= 100.0 for t in ("bbox", "matched_bbox"))
        mapping = json.loads((tmp_path / "run" / f"round{r}" / "eval" / "synthetic_shapes_val" / "cluster_mapping.json")
                             .read_text())
        assert set(mapping["clusters"]) <= {"1", "2", "3"} and mapping["conf"] == 0.0
        assert {m["category"] for m in mapping["clusters"].values() if m["category"]} <= \
            {"ellipse", "rectangle", "triangle", "star", "ring"}
    out = capsys.readouterr().out
    assert "matched_bbox/AP" in out and "round 1:" in out
    # A rerun finds everything done.
    again = main(run)
    assert all(again["stages"][s]["attempts"] == 1 for s in again["plan"])

    # The tools on the run's files: instances assigned to the saved centroids get the clusters K-means gave them,
    # and existing detections are evaluated without a model.
    assigned = cluster_main(["--embeddings", str(tmp_path / "run" / "u2seg" / "embeddings"),
                             "--centroids", str(tmp_path / "run" / "u2seg" / "clusters"),
                             "--instances", str(tmp_path / "run" / "labels" / "maskcut.json"),
                             "--output", str(tmp_path / "assigned.json")])
    assert assigned["num_clusters"] == 3 and assigned["instances"] == len(labels0.anns)
    assert [a["category_id"] for a in json.loads((tmp_path / "assigned.json").read_text())["annotations"]] == \
        [a["category_id"] for a in labels0.anns.values()]
    results = tmp_path / "run" / "round1" / "eval" / "synthetic_shapes_val" / "coco_instances_results.json"
    assert eval_main(["--results", str(results), "--output", str(tmp_path / "eval"),
                      f"datasets.root={tmp_path / 'run' / 'datasets'}", "u2seg.num_clusters=3", "u2seg.match_conf=0.0",
                      "u2seg.match_iou=0.3", "--datasets", "synthetic_shapes_val"]) == 0
    assert json.loads((tmp_path / "eval" / "synthetic_shapes_val" / "metrics.json").read_text())["matched_bbox"] == \
        metrics["matched_bbox"]


def test_merge_keeps_cluster_ids(tmp_path):
    rle = {"size": [4, 4], "counts": "04L0"}  # a 4x4 image, 4 pixels in the first column
    other = {"size": [4, 4], "counts": "<4"}  # the last column
    prev = {"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}],
            "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": rle, "bbox": [0, 0, 1, 4]}]}
    (tmp_path / "prev.json").write_text(json.dumps(prev))
    preds = [{"image_id": 1, "category_id": 2, "score": 0.9, "segmentation": other, "bbox": [3, 0, 1, 4]}]
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    merge_self_training_labels(tmp_path / "prev.json", tmp_path / "pred.json", tmp_path / "kept.json", 0.5,
                               keep_categories=True)
    kept = json.loads((tmp_path / "kept.json").read_text())
    assert [a["category_id"] for a in kept["annotations"]] == [2, 3] and kept["categories"] == prev["categories"]
    merge_self_training_labels(tmp_path / "prev.json", tmp_path / "pred.json", tmp_path / "fg.json", 0.5)
    assert {a["category_id"] for a in json.loads((tmp_path / "fg.json").read_text())["annotations"]} == {1}
    (tmp_path / "bad.json").write_text(json.dumps([{**preds[0], "category_id": 9}]))
    with pytest.raises(ValueError, match="category 9"):
        merge_self_training_labels(tmp_path / "prev.json", tmp_path / "bad.json", tmp_path / "x.json", 0.5,
                                   keep_categories=True)


def test_class_aware_results_carry_class_plus_one():
    inst = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 4.0]]), "scores": torch.tensor([0.2, 0.9]),
            "classes": torch.tensor([4, 0])}
    aware = instances_to_coco_results(inst, 7, with_masks=False, category_id=None)
    assert [(r["category_id"], r["score"]) for r in aware] == [(1, 0.9), (5, 0.2)]
    assert {r["category_id"] for r in instances_to_coco_results(inst, 7, with_masks=False)} == {1}


def test_class_aware_inference_plan_and_batches(tmp_path):
    """The option through the inference pieces: recorded in the folder's settings (a class-agnostic resume of
    it is refused), carried by the plan, and applied to each batch's detections."""
    images = [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}]
    agnostic = {"min_size": 32, "max_size": 64, "max_dets": 10, "with_masks": False, "num_images": 2}
    plan = plan_inference(images, tmp_path, {**agnostic, "class_aware": True}, True, 0, 1)
    assert plan.class_aware and not plan_inference(images, tmp_path / "b", agnostic, True, 0, 1).class_aware
    inst = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]), "scores": torch.tensor([0.5]), "classes": torch.tensor([2])}
    batch = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "height": 4, "width": 4, "image_id": 1,
              "file_name": "1.png"}, {"image_id": 2, "file_name": "2.png", "error": "unreadable"}]
    results, failures = predict_batch(lambda inputs: [{"instances": inst} for _ in inputs], batch, 10, False,
                                      plan.class_aware)
    assert [(r["image_id"], r["category_id"]) for r in results] == [(1, 3)] and [f["image_id"] for f in failures] == [2]
    ChunkWriter(tmp_path, 0, 1).add([1, 2], results, failures)
    with pytest.raises(ValueError, match="class_aware"):
        plan_inference(images, tmp_path, agnostic, True, 0, 1)
