"""The whole loop end to end on a tiny synthetic set: MaskCut -> round 0 -> one self-training round ->
evaluation -> report, interrupted at stage boundaries and resumed."""
import contextlib
import io
import json
from collections import Counter

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cutler.data.catalog import get_dataset
from cutler.pipeline.cli import main
from cutler.pipeline.runner import pseudo_mask_counts
from cutler.pipeline.stages import Manifest

TINY = [
    "pipeline.num_synthetic_train=6", "pipeline.num_synthetic_val=3", "pipeline.num_overlays=1",
    "pipeline.maskcut_overrides=['maskcut.fixed_size=128','maskcut.crf_workers=-1']",
    "pipeline.detector_overrides=['solver.max_iter=3','solver.steps=[2]','solver.warmup_iters=1',"
    "'solver.checkpoint_period=2','input.min_size_train=[128]','input.min_size_test=128','input.max_size_test=192']",
    "pipeline.selftrain_max_iter=2", "selftrain.rounds=1", "selftrain.score_thresholds=[0.0]",
]


def _assert_eval_stage_scored_its_predictions(run, r: int) -> None:
    """The eval stage predicted every held-out image (at most 100 detections each) and its metrics are
    pycocotools' own on those predictions (the synthetic ground truth has one category)."""
    metrics = json.loads((run / f"round{r}" / "eval" / "metrics.json").read_text())["synthetic_val"]
    dets = json.loads((run / f"round{r}" / "eval" / "synthetic_val" / "coco_instances_results.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(get_dataset("synthetic_val", run / "datasets").json_file))
        per_image = Counter(d["image_id"] for d in dets)
        assert set(per_image) == set(gt.getImgIds()) and len(per_image) == 3 and max(per_image.values()) <= 100
        assert set(metrics) == {"bbox", "segm"}
        for iou_type, values in metrics.items():
            E = COCOeval(gt, gt.loadRes(dets), iou_type)
            E.evaluate()
            E.accumulate()
            E.summarize()
            assert values["AP"] == pytest.approx(100 * E.stats[0], abs=1e-9), (r, iou_type)
            assert values["AP50"] == pytest.approx(100 * E.stats[1], abs=1e-9), (r, iou_type)
            assert values["AR100"] == pytest.approx(100 * E.stats[8], abs=1e-9), (r, iou_type)


def test_tiny_pipeline_runs_end_to_end_and_resumes_at_stage_boundaries(tmp_path, capsys):
    run = [f"pipeline.run_dir={tmp_path / 'run'}"] + TINY
    # An interrupted run: only the first stages happened.
    main(["--stage", "data", "--stage", "maskcut", *run])
    first = Manifest(tmp_path / "run").data["stages"]
    assert set(first) == {"data", "maskcut"} and all(s["status"] == "done" for s in first.values())
    labels0 = COCO(str(tmp_path / "run" / "labels" / "round0.json"))
    assert len(labels0.getAnnIds()) > 0 and len(labels0.imgs) == 6

    # The rerun picks up at the first unfinished stage and runs to the end.
    data = main(run)
    stages = data["stages"]
    assert data["plan"] == ["data", "maskcut", "train_r0", "eval_r0", "predict_r0", "merge_r1", "train_r1",
                            "eval_r1", "report"]
    assert all(stages[s]["status"] == "done" for s in data["plan"])
    assert stages["data"]["attempts"] == 1 and stages["maskcut"]["attempts"] == 1
    for r in (0, 1):
        _assert_eval_stage_scored_its_predictions(tmp_path / "run", r)
    # The round-0 detector predicted on every training image: what the merge read.
    predicted = {d["image_id"] for d in json.loads((tmp_path / "run" / "round0" / "predict" /
                                                    "coco_instances_results.json").read_text())}
    assert predicted == set(labels0.getImgIds())
    # Threshold 0: every prediction is kept, so round 1 trains on the round-0 detector's masks.
    merge = stages["merge_r1"]["metrics"]
    assert merge["kept_predictions"] > 0
    # Empty predicted masks (area < 1) are not written, so the count can be below the sum.
    assert merge["kept_previous"] < merge["annotations"] <= merge["kept_predictions"] + merge["kept_previous"]
    labels1 = COCO(str(tmp_path / "run" / "labels" / "round1.json"))
    assert len(labels1.getAnnIds()) == merge["annotations"]
    # The counts the report and summary print come from the manifest and match the label files.
    assert pseudo_mask_counts(data, 1) == [len(labels0.getAnnIds()), len(labels1.getAnnIds())]
    assert (tmp_path / "run" / "report" / "report.md").read_text().count("\n| ") >= 2
    assert (tmp_path / "run" / "report" / "ap_per_round.png").stat().st_size > 0
    assert len(list((tmp_path / "run" / "overlays" / "round1").glob("*.png"))) == 1
    out = capsys.readouterr().out
    assert "round 0:" in out and "round 1:" in out and "pseudo-masks" in out

    # A run killed inside eval_r1 redoes eval_r1 and what follows, nothing before it.
    m = Manifest(tmp_path / "run")
    m.stage("eval_r1")["status"] = "running"
    m.save()
    data = main(run)
    assert data["stages"]["train_r1"]["attempts"] == 1
    assert data["stages"]["eval_r1"]["attempts"] == 2 and data["stages"]["report"]["attempts"] == 2


def test_dry_run_prints_plan_without_running(tmp_path, capsys):
    main(["--dry-run", f"pipeline.run_dir={tmp_path / 'dry'}"] + TINY)
    out = capsys.readouterr().out
    assert "maskcut" in out and "train_r1" in out and "report" in out
    assert not (tmp_path / "dry" / "manifest.json").exists()
