"""UnSAM end to end: divide-and-conquer over a dataset (resume, hierarchy JSON, CRF on CPU and through the torch
path alike), the evaluation tables, the SA-1B converter, the hierarchy demo, and the pipeline variant."""
import json
import shutil

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from cutler.config import load_config
from cutler.data.mapper import resize_uint8
from cutler.data.synthetic import ensure_synthetic_dataset
from cutler.maskcut.dataset import list_dataset
from cutler.maskcut.writer import chunk_files, merge_outputs
from cutler.unsam.divide_conquer import DivideConquerModel, merge_image, run_divide_conquer
from cutler.unsam.postprocess import MergeSettings

TINY_UNSAM = ["unsam.divide.image_size=192", "unsam.conquer.crop_size=64", "unsam.merge.crf_size=64",
              "unsam.chunk_size=1"]


class GroundTruthDetector:
    """Stands in for a trained detector: the ground-truth objects (level 0) of the images, in the order the
    divide step receives them, with score 0.9 (plus one low-scoring mask that the threshold must drop)."""

    def __init__(self, coco: COCO, image_ids, size: int):
        self.coco, self.queue, self.size = coco, list(image_ids), size

    def __call__(self, inputs):
        outs = []
        for _ in inputs:
            img_id = self.queue.pop(0)
            anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id)) if a["level"] == 0]
            masks = [resize_uint8(self.coco.annToMask(a), self.size, self.size, "nearest").astype(bool) for a in anns]
            masks.append(np.ones((self.size, self.size), bool))
            scores = [0.9] * len(anns) + [0.1]
            outs.append({"instances": {"masks": torch.from_numpy(np.stack(masks)), "scores": torch.tensor(scores),
                                       "boxes": torch.zeros(len(masks), 4)}})
        return outs


@pytest.fixture(scope="module")
def parts_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return ensure_synthetic_dataset(root, num_train=3, num_val=2, seed=0, parts=True)


@pytest.fixture(scope="module")
def divided(parts_data, tmp_path_factory):
    """Divide-and-conquer over 3 synthetic_parts images with ground-truth divide masks and a random ViT-S/16."""
    torch.manual_seed(0)
    cfg = load_config("unsam/tiny.yaml", TINY_UNSAM)
    split = parts_data["train"]
    records, _ = list_dataset(str(split.json_file), str(split.image_root))
    coco = COCO(str(split.json_file))
    out = tmp_path_factory.mktemp("dc")
    model = DivideConquerModel(cfg.unsam, detector=GroundTruthDetector(coco, [r.id for r in records], 192))
    summary = run_divide_conquer(cfg.unsam, records, str(out), progress=False, model=model)
    merge_outputs(out, out / "pseudo.json")
    return {"cfg": cfg, "records": records, "coco": coco, "out": out, "summary": summary, "model": model}


def test_divide_conquer_writes_a_consistent_hierarchy(divided):
    s = divided["summary"]
    assert s["processed"] == 3 and s["failed"] == 0
    gt_objects = sum(1 for a in divided["coco"].anns.values() if a["level"] == 0)
    assert s["counts"]["divide"] == gt_objects  # the 0.1-score mask is below the threshold
    labels = COCO(str(divided["out"] / "pseudo.json"))
    anns = list(labels.anns.values())
    assert s["annotations"] == len(anns) and any(a["level"] > 0 for a in anns)
    for a in anns:
        assert a["level"] <= a["finest_level"]
        m = labels.annToMask(a)
        assert a["area"] == m.sum() > 0
        if a["level"] == 0:
            assert a["parent"] is None and a["score"] == 0.9
            continue
        assert "score" not in a
        if a["parent"] is not None:
            parent = labels.anns[a["parent"]]
            assert parent["image_id"] == a["image_id"] and parent["level"] < a["level"]
            assert (m & labels.annToMask(parent)).sum() >= 0.5 * m.sum()


def test_divide_conquer_resumes_and_is_deterministic(divided, tmp_path):
    out = tmp_path / "dc"
    shutil.copytree(divided["out"] / "shards", out / "shards")
    last = chunk_files(next((out / "shards").iterdir()))[-1]
    before = json.loads(open(last).read())
    (out / "shards" / next((out / "shards").iterdir()).name / last.split("/")[-1]).unlink()
    coco, records = divided["coco"], divided["records"]
    model = divided["model"]
    model.detector = GroundTruthDetector(coco, [records[-1].id], 192)
    torch.manual_seed(0)  # the same random ViT weights are already in the model; the rerun must redo one image
    summary = run_divide_conquer(divided["cfg"].unsam, records, str(out), progress=False, model=model)
    assert summary["skipped_already_done"] == 2 and summary["processed"] == 1
    after = json.loads(open(chunk_files(next((out / "shards").iterdir()))[-1]).read())
    assert after == before


def test_torch_crf_path_gives_the_same_masks_as_pydensecrf(divided, parts_data):
    split = parts_data["train"]
    rec = divided["records"][0]
    from cutler.utils.image import read_image_rgb

    rgb = read_image_rgb(rec.path)
    frame = np.array(resize_uint8(rgb, 192, 192))
    model = divided["model"]
    model.detector = GroundTruthDetector(divided["coco"], [rec.id], 192)
    raw = model([frame])[0]
    base = MergeSettings.from_config(divided["cfg"].unsam, "pydensecrf")
    cpu, cpu_stats = merge_image(raw, frame, rgb.shape[1], rgb.shape[0], base)
    torch_settings = MergeSettings(**{**base.__dict__, "crf": "precomputed"})
    dev, _ = merge_image(raw, frame, rgb.shape[1], rgb.shape[0], torch_settings, torch.device("cpu"))
    assert cpu_stats["after_nms"] > 0 and len(cpu) > 0
    assert [(a["level"], a["parent"]) for a in dev] == [(a["level"], a["parent"]) for a in cpu]
    for a, b in zip(cpu, dev):
        ma, mb = mask_util.decode(a["segmentation"]), mask_util.decode(b["segmentation"])
        assert (ma != mb).sum() <= 0.001 * ma.size
    assert split.image_root.is_dir()


def test_pseudo_mask_and_segmenter_ar_tables(parts_data, tmp_path):
    from cutler.unsam.evaluation import PUBLISHED_PSEUDO_AR, evaluate_pseudo_masks, evaluate_segmenter, pseudo_table

    gt = json.loads(parts_data["val"].json_file.read_text())
    perfect = evaluate_pseudo_masks(gt, gt)
    assert perfect["ar"]["AR"] == pytest.approx(100.0)
    wholes = {**gt, "annotations": [a for a in gt["annotations"] if a["level"] == 0]}
    partial = evaluate_pseudo_masks(wholes, gt)
    assert partial["ar"]["AR"] == pytest.approx(100.0 * len(wholes["annotations"]) / len(gt["annotations"]), abs=0.5)
    header, rows = pseudo_table(partial["ar"])
    assert header[1] == "AR1000" and rows[0][1] == partial["ar"]["AR"]
    assert rows[1:] == [[k, *v] for k, v in PUBLISHED_PSEUDO_AR.items()]

    class Oracle:
        """Returns the ground-truth masks of the image it is given (identified by its size)."""

        def __init__(self, coco):
            self.by_size = {(im["height"], im["width"]): im["id"] for im in coco.imgs.values()}
            self.coco = coco

        def __call__(self, inputs):
            out = []
            for x in inputs:
                anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=self.by_size[(x["height"], x["width"])]))
                masks = np.stack([self.coco.annToMask(a) for a in anns]).astype(bool)
                boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                         for a in anns]
                out.append({"instances": {"masks": torch.from_numpy(masks), "scores": torch.ones(len(anns)),
                                          "boxes": torch.tensor(boxes)}})
            return out

    cfg = load_config("unsam/tiny_segmenter.yaml", [f"datasets.root={tmp_path / 'none'}", f"output_dir={tmp_path}"])
    root = parts_data["val"].json_file.parents[2]
    printed = []
    res = evaluate_segmenter(Oracle(COCO(str(parts_data["val"].json_file))), cfg, ["COCO", "synthetic_parts_val"],
                             tmp_path / "eval", root, printer=printed.append)
    assert "COCO" in res["skipped"] and res["ar"]["synthetic_parts_val"]["AR"] == pytest.approx(100.0)
    assert "CutLER (paper)" in res["table"] and (tmp_path / "eval" / "unsam_ar.md").is_file()


def test_sa1b_converter(tmp_path):
    from cutler.unsam.sa1b import SA1BFormatError, convert_sa1b, list_sa1b_files

    masks = {}
    for k, (h, w) in enumerate([(30, 40), (20, 20), (25, 35)]):
        m = np.zeros((h, w), np.uint8)
        m[2:10, 3:12 + k] = 1
        rle = mask_util.encode(np.asfortranarray(m))
        anns = [{"id": 100 + k, "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                 "bbox": [3, 2, 9 + k, 8], "area": int(m.sum()), "predicted_iou": 0.9, "point_coords": [[5, 5]]},
                {"id": 200 + k, "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}}]
        (tmp_path / f"sa_{k + 1}.json").write_text(json.dumps(
            {"image": {"image_id": k + 1, "width": w, "height": h, "file_name": f"sa_{k + 1}.jpg"}, "annotations": anns}))
        masks[k + 1] = m
    files = list_sa1b_files(tmp_path)
    data = convert_sa1b(files)
    path = tmp_path / "out.json"
    path.write_text(json.dumps(data))
    coco = COCO(str(path))
    assert sorted(coco.imgs) == [1, 2, 3] and len(coco.anns) == 6 and coco.getCatIds() == [1]
    for a in coco.anns.values():
        assert np.array_equal(coco.annToMask(a), masks[a["image_id"]]) and a["area"] == masks[a["image_id"]].sum()
        assert a["bbox"] == [3.0, 2.0, 9.0 + a["image_id"] - 1, 8.0]
    subset = convert_sa1b(files, num_images=2, seed=1, exclude=["sa_2.jpg"])
    assert sorted(im["id"] for im in subset["images"]) == [1, 3]
    bad = json.loads((tmp_path / "sa_3.json").read_text())
    bad["annotations"][0]["segmentation"]["size"] = [1, 1]
    (tmp_path / "sa_3.json").write_text(json.dumps(bad))
    with pytest.raises(SA1BFormatError, match="sa_3.json: annotation 0 mask size"):
        convert_sa1b(files)


def _demo_main():
    """``main`` of tools/demo.py, imported from its file (a thin script, not a package module)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("demo_tool", Path(__file__).resolve().parents[1] / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_demo_draws_hierarchies(divided, parts_data, tmp_path):
    from cutler.unsam.visualize import draw_hierarchy

    pseudo = divided["out"] / "pseudo.json"
    images = parts_data["train"].image_root
    first = json.loads(pseudo.read_text())["images"][0]["file_name"]
    demo = _demo_main()
    demo(["--hierarchy-json", str(pseudo), "--input", str(images / first), "--output", str(tmp_path / "json")])
    written = list((tmp_path / "json").glob("*_hierarchy.png"))
    assert [p.name for p in written] == [first.replace(".png", "_hierarchy.png")]
    # the panels: the image, level 0, then every level a kept part exists at
    anns = [a for a in json.loads(pseudo.read_text())["annotations"] if a["image_id"] == 1]
    levels = sorted({lv for a in anns for lv in range(a["level"], a["finest_level"] + 1)})
    picture = draw_hierarchy(np.zeros((50, 80, 3), np.uint8) + 128,
                             [{**a, "segmentation": mask_util.encode(np.asfortranarray(
                                 np.pad(np.ones((10, 10), np.uint8), ((5 * i % 40, 0), (0, 70)))[:50, :80]))}
                              for i, a in enumerate(anns)], panel_width=80, columns=4)
    assert picture.shape == (-(-(1 + len(levels)) // 4) * 50, 320, 3)
    # divide-and-conquer on the spot (random tiny detector and ViT): a picture per image
    demo(["--hierarchy", "--config-file", "unsam/tiny.yaml", "--input", str(images / first), "--output",
          str(tmp_path / "live"), "unsam.divide.image_size=128", "unsam.conquer.crop_size=64",
          "unsam.divide.score_thresh=0.0", "unsam.divide.detector_overrides=['test.detections_per_image=4']"])
    assert len(list((tmp_path / "live").glob("*_hierarchy.png"))) == 1


def test_segmenter_registry_names_the_known_ones():
    from cutler.unsam.segmenter import SEGMENTERS, Segmenter, get_segmenter, register_segmenter

    assert get_segmenter("cascade_mask_rcnn") is SEGMENTERS["cascade_mask_rcnn"]
    with pytest.raises(KeyError, match="cascade_mask_rcnn"):
        get_segmenter("mask2former")
    register_segmenter("mask2former", Segmenter(lambda cfg, n: None, lambda cfg, w: None))
    try:
        assert get_segmenter("mask2former").description == ""
        with pytest.raises(KeyError, match="already registered"):
            register_segmenter("mask2former", SEGMENTERS["cascade_mask_rcnn"])
    finally:
        SEGMENTERS.pop("mask2former")


TINY_PIPELINE = [
    "pipeline.num_synthetic_train=3", "pipeline.num_synthetic_val=2", "pipeline.num_overlays=1",
    "pipeline.maskcut_overrides=['maskcut.fixed_size=128','maskcut.crf_workers=-1']",
    "pipeline.detector_overrides=['solver.max_iter=2','solver.steps=[1]','solver.warmup_iters=1',"
    "'solver.checkpoint_period=2','input.min_size_train=[128]','input.min_size_test=128','input.max_size_test=192',"
    "'test.detections_per_image=3']",
    "unsam.divide.image_size=160", "unsam.divide.score_thresh=0.0", "unsam.conquer.crop_size=64",
    "unsam.merge.crf=none",
    "unsam.learn.overrides=['solver.max_iter=2','solver.steps=[1]','solver.warmup_iters=1',"
    "'solver.checkpoint_period=2','input.min_size_train=[128]','input.min_size_test=128','input.max_size_test=192']",
    "unsam.learn.selftrain_max_iter=1", "unsam.learn.selftrain_score_thresh=0.0",
]


def test_unsam_pipeline_runs_end_to_end_and_resumes(tmp_path, capsys):
    from cutler.pipeline.cli import main
    from cutler.pipeline.stages import Manifest

    run = ["--config-file", "pipeline/unsam_embedded.yaml", f"pipeline.run_dir={tmp_path / 'run'}"] + TINY_PIPELINE
    main(run + ["--dry-run"])
    assert "divide_conquer" in capsys.readouterr().out and not (tmp_path / "run" / "manifest.json").exists()
    main(run + ["--stage", "data", "--stage", "maskcut", "--stage", "detector_r0"])  # an interrupted run
    data = main(run)
    stages = data["stages"]
    assert data["plan"] == ["data", "maskcut", "detector_r0", "divide_conquer", "pseudo_eval", "train_r0", "eval_r0",
                            "predict_r0", "merge_r1", "train_r1", "eval_r1", "report"]
    assert all(stages[s]["status"] == "done" for s in data["plan"])
    assert stages["detector_r0"]["attempts"] == 1 and stages["divide_conquer"]["attempts"] == 1
    labels = COCO(str(tmp_path / "run" / "segmenter" / "labels" / "round0.json"))
    anns = list(labels.anns.values())
    assert len(anns) == stages["divide_conquer"]["metrics"]["pseudo_masks"] > 0
    assert all(a["parent"] is None or labels.anns[a["parent"]]["level"] < a["level"] for a in anns)
    pseudo = stages["pseudo_eval"]["metrics"]
    assert 0.0 <= pseudo["AR"] <= 100.0
    for r in (0, 1):
        metrics = json.loads((tmp_path / "run" / "segmenter" / f"round{r}" / "eval" / "metrics.json").read_text())
        segm = metrics["synthetic_parts_val"]["segm"]
        assert 0.0 <= segm["AR100"] <= 100.0
    # the segmenter was evaluated with up to 1000 detections per image
    settings = json.loads((tmp_path / "run" / "segmenter" / "round0" / "eval" / "synthetic_parts_val" /
                           "inference_settings.json").read_text())
    assert settings["max_dets"] == 1000
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "UnSAM, CRF (paper) | 15.3" in report and "SOHES (paper) | 30.5" in report and "hierarchy.png" in report
    out = capsys.readouterr().out
    assert "pseudo-masks:" in out and "segmenter round 1:" in out
    # a run killed inside train_r1 redoes it and what follows, nothing before it
    m = Manifest(tmp_path / "run")
    m.stage("train_r1")["status"] = "running"
    m.save()
    data = main(run)
    assert data["stages"]["divide_conquer"]["attempts"] == 1 and data["stages"]["train_r1"]["attempts"] == 2
