"""Inference over a dataset with a small model that follows the detector interface: results format,
bad images, sharding, resume after a kill, and evaluation end to end."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from cutler.config import load_config
from cutler.data.catalog import register_dataset
from cutler.data.mapper import shortest_edge_size
from cutler.evaluation.evaluator import DatasetMissingError, evaluate_dataset
from cutler.evaluation.inference import (
    RESULTS_FILE,
    ChunkWriter,
    finished_image_ids,
    instances_to_coco_results,
    plan_inference,
    prepare_input,
    run_inference,
)

# (width, height, bright rectangle XYWH) per image
IMAGES = [(64, 48, (8, 6, 30, 20)), (50, 70, (10, 30, 25, 30)), (80, 40, (40, 4, 32, 32)),
          (40, 40, (2, 2, 20, 30)), (60, 60, (30, 30, 20, 20))]


class BrightBoxModel(torch.nn.Module):
    """Finds the bright rectangle in the resized input and reports it in original pixels (box + mask).

    It checks the interface: uint8 [3,h,w] inputs, outputs in the ``height x width`` frame.
    """

    def __init__(self, fail_after: int | None = None):
        super().__init__()
        self.calls = 0
        self.seen_sizes = []
        self.fail_after = fail_after

    def forward(self, batched_inputs):
        assert not self.training
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        outs = []
        for x in batched_inputs:
            img, H, W = x["image"], x["height"], x["width"]
            assert img.dtype == torch.uint8 and img.shape[0] == 3
            self.seen_sizes.append(tuple(img.shape[1:]))
            h, w = img.shape[1:]
            ys, xs = torch.nonzero(img[0] > 127, as_tuple=True)
            sx, sy = W / w, H / h
            box = torch.tensor([[xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy]],
                               dtype=torch.float32).round()
            mask = torch.zeros(1, H, W, dtype=torch.bool)
            x0, y0, x1, y1 = box[0].long().tolist()
            mask[0, y0:y1, x0:x1] = True
            # a second, low-scoring false positive, to see ordering and max_dets at work
            fp = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
            fp_mask = torch.zeros(1, H, W, dtype=torch.bool)
            fp_mask[0, :4, :4] = True
            outs.append({"instances": {"boxes": torch.cat([fp, box]), "scores": torch.tensor([0.1, 0.9]),
                                       "classes": torch.zeros(2, dtype=torch.int64),
                                       "masks": torch.cat([fp_mask, mask])}})
        return outs


def _make_dataset(root, corrupt: bool = True, img_dir=None, json_path=None):
    img_dir = img_dir or root / "images"
    json_path = json_path or root / "gt.json"
    img_dir.mkdir(parents=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, (w, h, (x, y, bw, bh)) in enumerate(IMAGES):
        arr = np.zeros((h, w, 3), np.uint8)
        arr[y:y + bh, x:x + bw] = 255
        Image.fromarray(arr).save(img_dir / f"{i}.png")
        images.append({"id": 100 + i, "file_name": f"{i}.png", "height": h, "width": w})
        m = np.zeros((h, w), np.uint8, order="F")
        m[y:y + bh, x:x + bw] = 1
        rle = mask_util.encode(m)
        rle["counts"] = rle["counts"].decode()
        anns.append({"id": i + 1, "image_id": 100 + i, "category_id": 1 + i % 2, "bbox": [x, y, bw, bh],
                     "area": bw * bh, "iscrowd": 0, "segmentation": rle})
    if corrupt:
        (img_dir / "bad.png").write_bytes(b"not a png at all")
        images.append({"id": 999, "file_name": "bad.png", "height": 10, "width": 10})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    json_path.write_text(json.dumps(gt))
    return gt, img_dir


def _load_results(path):
    return json.loads(path.read_text())


def test_resize_rule_and_input_format():
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    assert shortest_edge_size(100, 1000, 800, 1333) == (133, 1333)  # the long edge caps the scale
    assert shortest_edge_size(30, 40, 0, 1333) == (30, 40)
    x = prepare_input(np.zeros((30, 40, 3), np.uint8), 15, 100)
    assert x["image"].shape == (3, 15, 20) and x["image"].dtype == torch.uint8
    assert (x["height"], x["width"]) == (30, 40)


@pytest.mark.parametrize("short,size", [(24, (24, 32)), (150, (150, 200))], ids=["shrink", "enlarge"])
def test_prepare_input_resizes_exactly_like_detectron2(short, size):
    """Detectron2's test-time ResizeShortestEdge resamples the uint8 image with PIL BILINEAR."""
    img = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    x = prepare_input(img, short, 1333)
    nh, nw = size
    ref = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    assert np.array_equal(x["image"].permute(1, 2, 0).numpy(), ref)
    assert (x["height"], x["width"]) == (60, 80)


def test_instances_to_coco_results_boxes_masks_order():
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[1, 2:5, 3:9] = True
    inst = {"boxes": torch.tensor([[0, 0, 1, 1], [3, 2, 9, 5], [1, 1, 2, 2]], dtype=torch.float32),
            "scores": torch.tensor([0.2, 0.9, 0.5]), "masks": masks}
    res = instances_to_coco_results(inst, 7, max_dets=2)
    assert [r["score"] for r in res] == [0.9, 0.5]
    assert res[0]["bbox"] == [3.0, 2.0, 6.0, 3.0] and res[0]["image_id"] == 7 and res[0]["category_id"] == 1
    assert (mask_util.decode(res[0]["segmentation"]) == masks[1].numpy()).all()
    assert isinstance(res[0]["segmentation"]["counts"], str)
    json.dumps(res)  # JSON-ready
    assert "segmentation" not in instances_to_coco_results(inst, 7, with_masks=False)[0]


def test_evaluate_dataset_end_to_end_with_a_bad_image(tmp_path):
    gt, img_dir = _make_dataset(tmp_path / "data")
    register_dataset("test_bright_boxes", str(img_dir), str(tmp_path / "data" / "gt.json"), overwrite=True)
    cfg = load_config(None, ["model.mask_on=true", "input.min_size_test=32", "input.max_size_test=100",
                             "eval.batch_size=2", "eval.chunk_size=2", "dataloader.num_workers=0"])
    model = BrightBoxModel()
    out = tmp_path / "out"
    metrics = evaluate_dataset(model, cfg, "test_bright_boxes", output_dir=out)
    # the rectangle is found up to the resize round trip: every prediction has IoU > 0.75
    for t in ("bbox", "segm"):
        assert metrics[t]["AP50"] == pytest.approx(100.0) and metrics[t]["AP75"] == pytest.approx(100.0)
    assert len(model.seen_sizes) == len(IMAGES) and all(min(hw) == 32 for hw in model.seen_sizes)
    assert model.training  # mode restored
    failures = json.loads((out / "failures.json").read_text())
    assert [f["image_id"] for f in failures] == [999] and "not an image" in failures[0]["reason"]
    # pycocotools reads the merged file back
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "data" / "gt.json"))
        dets = coco.loadRes(str(out / RESULTS_FILE))
    assert len(dets.getAnnIds()) == 2 * len(IMAGES)
    report = json.loads((out / "metrics_test_bright_boxes.json").read_text())
    assert report["num_unreadable_images"] == 1 and report["metrics"]["bbox"]["AP50"] == pytest.approx(100.0)
    assert (out / "metrics_test_bright_boxes.md").is_file() and (out / "metrics_test_bright_boxes.csv").is_file()


def test_missing_dataset_is_a_clear_error(tmp_path):
    register_dataset("test_absent", "nowhere/images", "nowhere/gt.json", overwrite=True)
    with pytest.raises(DatasetMissingError, match="not found"):
        evaluate_dataset(BrightBoxModel(), load_config(None, []), "test_absent", root=tmp_path)


def test_resume_after_kill_gives_no_duplicates(tmp_path):
    gt, img_dir = _make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    kw = dict(min_size=32, max_size=100, batch_size=1, chunk_size=2, progress=False)
    killed = BrightBoxModel(fail_after=3)  # dies inside the second chunk
    with pytest.raises(KeyboardInterrupt):
        run_inference(killed, gt["images"], img_dir, out, **kw)
    assert finished_image_ids(out) == {100, 101}  # only the committed first chunk counts
    assert not (out / RESULTS_FILE).exists()

    again = BrightBoxModel()
    path = run_inference(again, gt["images"], img_dir, out, **kw)
    assert again.calls == len(IMAGES) - 2  # the bad image needs no model call
    results = _load_results(path)
    ids = [r["image_id"] for r in results]
    assert sorted(ids) == sorted([100 + i for i in range(len(IMAGES))] * 2)  # each image exactly once (2 dets)

    third = BrightBoxModel()  # everything done: nothing recomputed, same merged file
    assert run_inference(third, gt["images"], img_dir, out, **kw) == path and third.calls == 0
    assert _load_results(path) == results

    fresh = BrightBoxModel()
    run_inference(fresh, gt["images"], img_dir, out, resume=False, **kw)
    assert fresh.calls == len(IMAGES) and len(_load_results(path)) == len(results)


def test_shards_cover_the_dataset_once_and_the_last_one_merges(tmp_path):
    gt, img_dir = _make_dataset(tmp_path / "data", corrupt=False)
    out = tmp_path / "out"
    kw = dict(min_size=32, max_size=100, batch_size=1, chunk_size=1, progress=False, world_size=3)
    # an orphan results file from a killed run (no done mark) must be ignored
    (out / "chunks").mkdir(parents=True)
    (out / "chunks" / "r0000_000000.results.json").write_text(json.dumps([{"image_id": 100, "bbox": [0, 0, 1, 1],
                                                                          "score": 1.0}]))
    models = [BrightBoxModel() for _ in range(3)]
    assert run_inference(models[0], gt["images"], img_dir, out, rank=0, **kw) is None
    assert run_inference(models[2], gt["images"], img_dir, out, rank=2, **kw) is None
    path = run_inference(models[1], gt["images"], img_dir, out, rank=1, **kw)
    assert [m.calls for m in models] == [2, 2, 1]  # ids[rank::3] of 5 images, one image per chunk
    ids = [r["image_id"] for r in _load_results(path)]
    assert sorted(ids) == sorted([100 + i for i in range(len(IMAGES))] * 2)
    assert not any(r["bbox"] == [0, 0, 1, 1] for r in _load_results(path))


def test_zero_shot_table_evaluates_present_benchmarks_and_skips_the_rest(tmp_path):
    from cutler.evaluation.zero_shot import run_zero_shot

    root = tmp_path / "datasets"
    _make_dataset(root, corrupt=False, img_dir=root / "coco" / "val2017",
                  json_path=root / "coco" / "annotations" / "instances_val2017.json")
    _make_dataset(root, corrupt=False, img_dir=root / "voc" / "VOC2007" / "JPEGImages",
                  json_path=root / "voc" / "annotations" / "voc07_trainval_cls_agnostic.json")
    cfg = load_config(None, ["model.mask_on=true", "input.min_size_test=32", "input.max_size_test=100",
                             f"datasets.root={root}", f"output_dir={tmp_path / 'out'}",
                             "dataloader.num_workers=0"])
    lines = []
    out = run_zero_shot(BrightBoxModel(), cfg, datasets=["coco_2017_val", "voc07_trainval", "kitti_trainval"],
                        printer=lines.append)
    assert set(out["metrics"]) == {"COCO", "VOC"} and set(out["skipped"]) == {"KITTI"}
    assert any(line.startswith("[skip] KITTI") and "kitti_trainval_cls_agnostic.json" in line for line in lines)
    assert any("using voc07_trainval" in line for line in lines)  # the 9,963-image file is absent
    assert out["metrics"]["COCO"]["segm"]["AP50"] == pytest.approx(100.0)
    assert "segm" not in out["metrics"]["VOC"]  # the VOC benchmark has boxes only
    assert "average (2/11)" in out["table"] and "21.9" in out["table"] and "24.3" in out["table"]
    report = json.loads((tmp_path / "out" / "zero_shot" / "zero_shot.json").read_text())
    assert report["metrics"]["VOC"]["bbox"]["AP50"] == pytest.approx(100.0)
    md = (tmp_path / "out" / "zero_shot" / "coco_full_row.md").read_text()
    assert "| CutLER (paper) | 21.9 | 11.8 | 12.3 | 18.9 | 9.2 | 9.7 |" in md
    assert "| ours | 100.0 | 100.0 |" in md

    from cutler.evaluation.zero_shot import run_corloc

    again = BrightBoxModel()
    c = run_corloc(again, cfg, datasets=["voc07_trainval", "coco20k"], printer=lines.append)
    assert again.calls == 0  # the zero-shot run's VOC predictions are reused
    assert c["corloc"]["voc07_trainval"]["corloc"] == pytest.approx(100.0) and set(c["skipped"]) == {"coco20k"}
    assert json.loads((tmp_path / "out" / "zero_shot" / "voc07_trainval" / "corloc_voc07_trainval.json").read_text()
                      )["num_images"] == len(IMAGES)


def test_zero_shot_table_average_is_over_evaluated_benchmarks():
    from cutler.evaluation.zero_shot import BENCHMARKS, select_benchmarks, zero_shot_table

    per = {"COCO": {"bbox": {"AP50": 10.0, "AR100": 20.0}}, "KITTI": {"bbox": {"AP50": 30.0, "AR100": 40.0}}}
    header, rows = zero_shot_table(per)
    assert rows[-1][0] == "average (2/11)" and rows[-1][1] == pytest.approx(20.0) and rows[-1][3] == pytest.approx(30.0)
    assert len(rows) == len(BENCHMARKS) + 1
    assert [b.label for b in select_benchmarks(["voc07_trainvaltest", "LVIS"])] == ["VOC", "LVIS"]
    with pytest.raises(KeyError, match="not zero-shot benchmarks"):
        select_benchmarks(["imagenet_train"])


def test_demo_writes_overlays_above_the_confidence(tmp_path):
    from cutler.evaluation.demo import run_demo

    _, img_dir = _make_dataset(tmp_path / "data")
    written = run_demo(BrightBoxModel(), [str(img_dir / "0.png"), str(img_dir / "*.png")], tmp_path / "vis",
                       min_size=32, max_size=100, confidence=0.5)
    assert [p.name for p in written] == [f"{i}.png" for i in range(len(IMAGES))]  # bad.png skipped, no repeats
    vis = np.asarray(Image.open(written[0]).convert("RGB"))
    w, h, (x, y, bw, bh) = IMAGES[0]
    assert vis.shape == (h, w, 3)
    # the kept detection's box outline is coloured; the 0.1-score false positive at the corner is not drawn
    assert (vis[y, x + bw // 2] != [255, 255, 255]).any()
    assert (vis[1, 1] == 0).all()


def _dist_worker(rank, world, port, data_dir, out_dir, ret_dir):
    import os

    from cutler.engine.launch import init_distributed_from_env

    # the environment torchrun gives each rank of tools/eval_zero_shot.py
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert init_distributed_from_env() and torch.distributed.get_backend() == "gloo"
    try:
        gt = json.loads((data_dir / "gt.json").read_text())
        model = BrightBoxModel()
        path = run_inference(model, gt["images"], data_dir / "images", out_dir, min_size=32, max_size=100,
                             batch_size=1, chunk_size=1, progress=False)
        (ret_dir / f"{rank}.json").write_text(json.dumps({"path": str(path) if path else None, "calls": model.calls}))
    finally:
        torch.distributed.destroy_process_group()


def test_torch_distributed_ranks_shard_and_rank0_merges(tmp_path):
    import torch.multiprocessing as mp

    from cutler.engine.launch import find_free_port

    _make_dataset(tmp_path / "data")
    (tmp_path / "ret").mkdir()
    # fork: the children inherit the imported modules (spawn would import torch twice more, ~10 s)
    mp.start_processes(_dist_worker, args=(2, find_free_port(), tmp_path / "data", tmp_path / "out", tmp_path / "ret"),
                       nprocs=2, join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / "ret" / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["path"] is not None and r1["path"] is None  # rank 0 merges after the barrier
    assert r0["calls"] + r1["calls"] == len(IMAGES) and r0["calls"] == 3  # ids[0::2] of 6, one unreadable
    ids = [r["image_id"] for r in _load_results(tmp_path / "out" / RESULTS_FILE)]
    assert sorted(ids) == sorted([100 + i for i in range(len(IMAGES))] * 2)


def test_demo_tool_with_the_real_detector_from_random_weights(tmp_path, caplog):
    import importlib.util
    from pathlib import Path

    _, img_dir = _make_dataset(tmp_path / "data", corrupt=False)
    spec = importlib.util.spec_from_file_location("demo_tool", Path(__file__).resolve().parents[1] / "tools" / "demo.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    import logging

    cutler_logger = logging.getLogger("cutler")  # does not propagate to the root logger caplog watches
    cutler_logger.addHandler(caplog.handler)
    try:
        tool.main(["--input", str(img_dir / "0.png"), "--output", str(tmp_path / "vis"), "--confidence", "0",
                   "--config-file", "tiny/synthetic_cascade", "model.device=cpu", "input.min_size_test=64",
                   "input.max_size_test=96", "model.rpn.post_nms_topk_test=20"])
    finally:
        cutler_logger.removeHandler(caplog.handler)
    vis = np.asarray(Image.open(tmp_path / "vis" / "0.png").convert("RGB"))
    assert vis.shape == (IMAGES[0][1], IMAGES[0][0], 3)
    assert (vis != np.asarray(Image.open(img_dir / "0.png").convert("RGB"))).any()  # detections were drawn
    assert any("RANDOMLY INITIALISED" in r.getMessage() for r in caplog.records)


def test_plan_shards_by_sorted_id_and_skips_committed_images(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png"} for i in (5, 3, 9, 1, 7)]
    settings = {"min_size": 32, "max_size": 64, "max_dets": 10, "with_masks": True, "num_images": len(images)}
    plans = [plan_inference(images, tmp_path, settings, True, rank, 2) for rank in (0, 1)]
    assert [[im["id"] for im in p.todo] for p in plans] == [[1, 5, 9], [3, 7]]
    assert plans[0].all_ids == {1, 3, 5, 7, 9} and plans[0].with_masks
    writer = ChunkWriter(tmp_path, 1, chunk_size=2)
    writer.add([3], [], [{"image_id": 3, "file_name": "3.png", "reason": "unreadable"}])
    assert finished_image_ids(tmp_path) == set()  # nothing committed below chunk_size
    writer.commit()
    assert writer.committed == 1 and finished_image_ids(tmp_path) == {3}
    assert [im["id"] for im in plan_inference(images, tmp_path, settings, True, 1, 2).todo] == [7]
    # without resume every image of the shard is planned again, and rank 0 deletes the chunks
    assert [im["id"] for im in plan_inference(images, tmp_path, settings, False, 1, 2).todo] == [3, 7]
    assert finished_image_ids(tmp_path) == {3}
    plan_inference(images, tmp_path, settings, False, 0, 2)
    assert finished_image_ids(tmp_path) == set()
    with pytest.raises(ValueError, match="not unique"):
        plan_inference(images + images[:1], tmp_path / "dup", settings, True, 0, 1)


def test_resume_refuses_other_settings_and_keeps_masks(tmp_path):
    gt, img_dir = _make_dataset(tmp_path / "data", corrupt=False)
    out = tmp_path / "out"
    kw = dict(max_size=100, batch_size=1, chunk_size=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_inference(BrightBoxModel(fail_after=2), gt["images"], img_dir, out, min_size=32, with_masks=True, **kw)
    with pytest.raises(ValueError, match="min_size: 32 -> 40"):
        run_inference(BrightBoxModel(), gt["images"], img_dir, out, min_size=40, **kw)
    # a box-only rerun over mask chunks keeps encoding masks, so all chunks stay alike
    path = run_inference(BrightBoxModel(), gt["images"], img_dir, out, min_size=32, with_masks=False, **kw)
    assert all("segmentation" in r for r in _load_results(path))
    box_out = tmp_path / "boxes"
    run_inference(BrightBoxModel(fail_after=2), gt["images"][:2], img_dir, box_out, min_size=32, with_masks=False, **kw)
    with pytest.raises(ValueError, match="with_masks"):
        run_inference(BrightBoxModel(), gt["images"][:2], img_dir, box_out, min_size=32, with_masks=True, **kw)
