"""A tiny detector following the model interface, a tiny config, and a child-process entry point for the
kill-and-resume test (``python tests/test_trainer_fixtures.py ...``). No tests here."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class TinyDetector(nn.Module):
    """Per image: conv -> BN -> ReLU -> global pool -> linear, predicting the mean normalised box of the
    image's instances and their count. Training: ``{"loss_box", "loss_count"}`` averaged over the images
    of the batch (so DDP's gradient average equals one process on the whole batch). Eval: one box per image.

    ``nan_at``: forward call number (0-based) whose ``loss_count`` is NaN; ``sleep``: seconds per forward.
    """

    def __init__(self, nan_at: int = -1, sleep: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.box = nn.Linear(8, 4)
        self.count = nn.Linear(8, 1)
        self.nan_at, self.sleep, self.calls = nan_at, sleep, 0

    def _features(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.float() / 255.0 - 0.5)[None]
        return torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3))[0]

    def forward(self, batched_inputs):
        if self.sleep:
            time.sleep(self.sleep)
        feats = torch.stack([self._features(d["image"]) for d in batched_inputs])
        boxes = torch.sigmoid(self.box(feats))
        if not self.training:
            out = []
            for d, b in zip(batched_inputs, boxes):
                h, w = d["image"].shape[1:]
                sx, sy = d["width"] / w, d["height"] / h
                out.append({"instances": {"boxes": (b * torch.tensor([w * sx, h * sy, w * sx, h * sy]))[None],
                                          "scores": torch.ones(1), "classes": torch.zeros(1, dtype=torch.int64),
                                          "masks": torch.zeros((1, d["height"], d["width"]), dtype=torch.bool)}})
            return out
        targets, counts = [], []
        for d in batched_inputs:
            h, w = d["image"].shape[1:]
            bx = d["instances"]["boxes"]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            targets.append((bx / scale).mean(0) if len(bx) else torch.full((4,), 0.5))
            counts.append(float(len(bx)))
        loss_box = (boxes - torch.stack(targets)).abs().sum(1).mean()
        loss_count = ((self.count(feats)[:, 0] - torch.tensor(counts)) ** 2).mean()
        if self.calls == self.nan_at:
            loss_count = loss_count * float("nan")
        self.calls += 1
        return {"loss_box": loss_box, "loss_count": loss_count}


def tiny_overrides(root, name: str, out_dir, max_iter: int = 6, ims_per_batch: int = 2, **extra) -> list:
    """Overrides for a CPU run of a few iterations on a registered tiny dataset."""
    ov = {
        "datasets.train": f"[{name}]", "datasets.root": str(root), "model.roi_heads.num_classes": 1,
        "model.device": "cpu", "input.min_size_train": "[32,40,48]", "input.max_size_train": 96,
        "solver.ims_per_batch": ims_per_batch, "solver.base_lr": 0.05, "solver.max_iter": max_iter,
        "solver.steps": f"[{max_iter // 2}]", "solver.warmup_iters": 2, "solver.checkpoint_period": 2,
        "solver.log_period": 1, "solver.weight_decay": 1e-4, "dataloader.num_workers": 0, "seed": 0,
        "output_dir": str(out_dir), "test.precise_bn.enabled": "false", "test.eval_period": 0,
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def child_main(argv):
    """``child image_root json_file out_dir max_iter resume(0|1) sleep [key=value ...]``: train TinyDetector."""
    torch.set_num_threads(1)
    from cutler.config import load_config
    from cutler.data.catalog import register_dataset
    from cutler.engine import train

    image_root, json_file, out_dir, max_iter, resume, sleep = argv[:6]
    register_dataset("tiny_child", image_root, json_file, overwrite=True)
    cfg = load_config(None, tiny_overrides("/", "tiny_child", out_dir, int(max_iter)) + list(argv[6:]))
    print(train(cfg, resume=bool(int(resume)), model_builder=lambda c: TinyDetector(sleep=float(sleep))), flush=True)


if __name__ == "__main__":
    child_main(sys.argv[1:])
