"""A tiny end-to-end U2Seg panoptic run on the synthetic panoptic set: STEGO stuff labels -> panoptic
pseudo-labels (things from instance files whose categories stand for clusters) -> the universal model trained a
few iterations -> panoptic inference -> PQ after matching; and the dataset evaluation on the ground truth itself."""
import json
import shutil

import numpy as np
import pytest

from cutler.config import load_config
from cutler.data.synthetic import ensure_synthetic_panoptic_dataset
from cutler.u2seg.panoptic import load_panoptic_json, read_label_png, read_panoptic_png
from cutler.u2seg.panoptic_eval import evaluate_panoptic


@pytest.fixture(scope="module")
def panoptic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    ensure_synthetic_panoptic_dataset(root, num_train=4, num_val=2, seed=0)
    return root


def test_evaluating_the_ground_truth_gives_full_marks(panoptic_root, tmp_path):
    """Ground truth written as cluster-level predictions (things: shape id as cluster, stuff: 5 + class): the
    matching recovers the identity and PQ = SQ = RQ = 100."""
    val = panoptic_root / "synthetic_panoptic" / "val"
    gt = load_panoptic_json(val / "panoptic.json")
    pred = tmp_path / "pred"
    (pred / "panoptic").mkdir(parents=True)
    isthing = {c["id"]: c["isthing"] for c in gt["categories"]}
    with open(pred / "records.jsonl", "w") as rec, open(pred / "instances.jsonl", "w") as inst:
        for a in gt["annotations"]:
            shutil.copy(val / "panoptic" / a["file_name"], pred / "panoptic" / a["file_name"])
            segs = [{"id": s["id"], "category_id": s["category_id"], "isthing": bool(isthing[s["category_id"]])}
                    for s in a["segments_info"]]
            rec.write(json.dumps({"image_id": a["image_id"], "file_name": a["file_name"], "segments_info": segs}) + "\n")
            ids = read_panoptic_png(val / "panoptic" / a["file_name"])
            from cutler.structures.rle import encode_masks

            things = [s for s in a["segments_info"] if isthing[s["category_id"]]]
            for s, rle in zip(things, encode_masks(np.stack([ids == s["id"] for s in things]))):
                inst.write(json.dumps({"image_id": a["image_id"], "category_id": s["category_id"], "score": 1.0,
                                       "bbox": s["bbox"], "segmentation": rle}) + "\n")
    res = evaluate_panoptic(pred, val / "panoptic.json", val / "panoptic", num_things=5, conf=0.5, iou=0.5)
    assert res["PQ"] == pytest.approx(100.0) and res["SQ"] == pytest.approx(100.0) and res["RQ"] == pytest.approx(100.0)
    assert res["thing_mapping"] == {str(c): c for c in map(int, res["thing_mapping"])}
    assert res["stuff_mapping"] == {str(c): c for c in map(int, res["stuff_mapping"])}


def test_tiny_panoptic_run(panoptic_root, tmp_path):
    from cutler.engine import train
    from cutler.maskcut.dataset import list_dataset
    from cutler.modeling.build import build_model_with_weights
    from cutler.u2seg.panoptic import make_panoptic_labels
    from cutler.u2seg.panoptic_eval import predict_panoptic
    from cutler.u2seg.stego_run import infer_stego, train_stego

    split = panoptic_root / "synthetic_panoptic" / "train"
    records, _ = list_dataset(str(split / "annotations.json"), str(split / "images"))
    stego = load_config(None, ["stego.vit_arch=small", "stego.patch_size=16", "stego.dim=8", "stego.res=32",
                               "stego.batch_size=3", "stego.max_steps=2", "stego.num_workers=0", "stego.crf=none",
                               f"stego.out_dir={tmp_path / 'stego'}", "stego.num_clusters=3", "stego.probe_images=8",
                               "stego.infer_size=64", "stego.num_neighbors=2", "stego.dtype=float32"]).stego
    train_stego(stego, records, progress=False)
    assert infer_stego(stego, records, progress=False)["processed"] == 4
    # things: the shape annotations stand for a clustering with 5 clusters
    labels = tmp_path / "labels"
    counts = make_panoptic_labels(split / "annotations_shapes.json", tmp_path / "stego" / "labels", labels,
                                  num_things=5, num_stuff=3, progress=False)
    assert counts["complete"] and counts["missing_stuff"] == 0
    pan = load_panoptic_json(labels / "panoptic.json")
    assert len(pan["annotations"]) == 4 and [c["id"] for c in pan["categories"]] == list(range(1, 9))
    for a in pan["annotations"]:
        ids = read_panoptic_png(labels / "panoptic" / a["file_name"])
        assert {s["id"] for s in a["segments_info"]} == set(np.unique(ids).tolist()) - {0}
        sem = read_label_png(labels / "semantic" / a["file_name"])
        assert set(np.unique(sem).tolist()) <= {0, 1, 2, 3, 255}
    # the universal model on the pseudo-labels: a few iterations, then panoptic inference and matched PQ
    cfg = load_config("tiny/synthetic_panoptic", [
        f"datasets.train=['{labels / 'instances.json'}@{split / 'images'}']", f"output_dir={tmp_path / 'train'}",
        "solver.max_iter=6", "solver.steps=[6]", "solver.warmup_iters=1", "solver.checkpoint_period=100",
        "solver.log_period=1", "input.min_size_train=[128]", "input.max_size_train=192", "input.min_size_test=128",
        "input.max_size_test=192", "model.device=cpu"])
    train(cfg)
    logged = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss_sem_seg"]) for r in logged) and len(logged) == 6
    model = build_model_with_weights(cfg, tmp_path / "train" / "model_final.pth", "exact")
    val = panoptic_root / "synthetic_panoptic" / "val"
    gt = load_panoptic_json(val / "panoptic.json")
    predict_panoptic(model, gt["images"], val / "images", tmp_path / "pred", num_things=5, min_size=128, max_size=192,
                     progress=False)
    res = evaluate_panoptic(tmp_path / "pred", val / "panoptic.json", val / "panoptic", num_things=5, conf=0.0, iou=0.3)
    assert res["images"] == 2 and all(0.0 <= res[k] <= 100.0 for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"))
    # the demo draws the panoptic output
    from cutler.evaluation.demo import run_demo

    written = run_demo(model, [str(val / "images" / gt["images"][0]["file_name"])], tmp_path / "demo", 128, 192,
                       stuff_names={1: "sky"})
    assert len(written) == 1 and read_panoptic_png(written[0]).shape[:2] == (gt["images"][0]["height"],
                                                                            gt["images"][0]["width"])
