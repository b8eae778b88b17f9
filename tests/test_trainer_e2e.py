"""tools/train_net.py end to end with the real Cascade Mask R-CNN (tiny images, few iterations, CPU)."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from cutler.checkpoint import Checkpointer
from cutler.config import load_config
from cutler.engine.defaults import TINY_CONFIG, eval_only_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_net_tiny_cascade_trains_checkpoints_and_resumes(synthetic_root, tmp_path):
    import train_net

    out = tmp_path / "run"
    common = [f"datasets.root={synthetic_root}", f"output_dir={out}", "input.min_size_train=[96]",
              "input.max_size_train=160", "solver.ims_per_batch=2", "solver.checkpoint_period=1",
              "solver.log_period=1", "solver.warmup_iters=1", "dataloader.num_workers=1",
              "model.rpn.post_nms_topk_train=64", "model.roi_heads.batch_size_per_image=32"]
    train_net.main(common + ["solver.max_iter=2"])  # no --config-file: the tiny synthetic recipe on the CPU
    rows = _metrics(out)
    assert [r["iteration"] for r in rows] == [1, 2]
    for name in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls_stage0", "loss_box_reg_stage2", "loss_mask"):
        assert all(math.isfinite(r[name]) for r in rows), name
    ckpt = Checkpointer.load(out / "model_final.pth")
    assert ckpt["iteration"] == 2 and "roi_heads.box_predictor.2.cls_score.weight" in ckpt["model"]

    # --resume with a longer schedule continues at iteration 2 from model_final.pth.
    train_net.main(common + ["solver.max_iter=3", "--resume"])
    rows2 = _metrics(out)
    assert [r["iteration"] for r in rows2] == [1, 2, 3] and rows2[:2] == rows
    final = Checkpointer.load(out / "model_final.pth")
    assert final["iteration"] == 3

    # --eval-only without model.weights evaluates the run's last checkpoint, every tensor of it.
    model = eval_only_model(load_config(TINY_CONFIG, common + ["model.device=cpu"]))
    assert not model.training and model.state_dict().keys() == final["model"].keys()
    assert all(torch.equal(v, final["model"][k]) for k, v in model.state_dict().items())
