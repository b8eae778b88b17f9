"""A tiny Cascade Mask R-CNN trained on synthetic ground truth: its box AP on those images rises well
above a random-init model's (the trainer, data pipeline, detector and evaluator working together)."""
import pytest

from cutler.config import load_config
from cutler.engine import train
from cutler.evaluation import build_eval_model, evaluate_dataset


@pytest.mark.slow
def test_tiny_detector_ap_rises_with_training(synthetic_root, tmp_path):
    cfg = load_config("tiny/synthetic_cascade.yaml", [
        f"datasets.root={synthetic_root}", "datasets.train=[synthetic_train]", "datasets.test=[synthetic_train]",
        f"output_dir={tmp_path / 'train'}", "solver.max_iter=120", "solver.steps=[96]", "solver.warmup_iters=10",
        "solver.checkpoint_period=120", "model.roi_heads.use_droploss=false", "dataloader.copy_paste=false",
        "input.min_size_train=[192]", "input.min_size_test=192", "seed=0"])
    weights = train(cfg)
    before = evaluate_dataset(build_eval_model(cfg, None), cfg, "synthetic_train", output_dir=tmp_path / "init")
    after = evaluate_dataset(build_eval_model(cfg, str(weights)), cfg, "synthetic_train", output_dir=tmp_path / "trained")
    # Measured on CPU: AP50 0.5 -> 28.3 (AP 13.0) with seed 0, 0.4 -> 40.8 (AP 21.1) with seed 1. With Detectron2's
    # PIL resampling the tiny model takes off later than it did with OpenCV's (80 iterations gave AP50 9-21 over
    # seeds 0-2, against 24-29 before), hence 120 iterations.
    assert before["bbox"]["AP50"] < 5.0
    assert after["bbox"]["AP50"] > before["bbox"]["AP50"] + 10.0
    assert after["bbox"]["AP"] > 3.0
