"""The U2Seg panoptic loop as one resumable command (``tools/run_pipeline.py``, ``pipeline.variant=u2seg_panoptic``).

Stages (recorded in ``run_dir/manifest.json`` like the CutLER pipeline, each runnable alone with ``--stage``):

    data             (embedded default only) the synthetic panoptic train / val sets (objects on sky / ground / water)
    maskcut          MaskCut pseudo-masks of the training images -> labels/maskcut.json
    embed            instance embeddings of the masks -> u2seg/embeddings/
    cluster          K-means into u2seg.num_clusters -> labels/round0.json (cluster ids as categories)
    stego_train      the STEGO head, neighbours and cluster probe -> stego/stego_final.pth
    stego_infer      stuff labels of every training image -> stego/labels/
    panoptic_labels  things first, then stuff, else void -> panoptic_labels/ (COCO panoptic + instances.json)
    train            the universal model (Panoptic FPN on the cascade) on the panoptic pseudo-labels
    eval             panoptic inference on the evaluation set, cluster -> category matching, PQ / SQ / RQ;
                     PixelAcc / mIoU of its semantic reading when semantic ground truth is given
    report           Markdown table with the published rows, and panoptic overlays

With ``pipeline.train_images`` empty every network starts from random weights (or the configured checkpoints)
on the generated data, so the loop runs on a CPU in minutes; its numbers show the machinery works.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from cutler.pipeline.runner import _q, run_maskcut_stage, training_records
from cutler.pipeline.stages import Stage
from cutler.utils.io import atomic_write_json, atomic_write_text
from cutler.utils.logging import get_logger

logger = get_logger(__name__)


class PanopticPipelinePlan:
    """Paths, sub-configs and stages of one panoptic run (see the module docstring)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        p = cfg.pipeline
        self.run_dir = Path(p.run_dir).resolve()
        self.embedded = not p.train_images
        if self.embedded:
            self.datasets_root = self.run_dir / "datasets"
            split = self.datasets_root / "synthetic_panoptic"
            self.train_json: Optional[Path] = split / "train" / "annotations.json"
            self.train_images = split / "train" / "images"
            self.gt_json, self.gt_dir = split / "val" / "panoptic.json", split / "val" / "panoptic"
            self.gt_images, self.semantic_gt = split / "val" / "images", split / "val" / "semantic"
        else:
            self.datasets_root = Path(cfg.datasets.root).resolve()
            if str(p.train_images).endswith(".json"):
                self.train_json = Path(p.train_images).resolve()
                self.train_images = Path(p.train_image_root or self.train_json.parent).resolve()
            else:
                self.train_json, self.train_images = None, Path(p.train_images).resolve()
            pan = cfg.panoptic
            if not (pan.gt_json and pan.gt_dir and pan.image_root):
                raise ValueError("panoptic.gt_json, panoptic.gt_dir and panoptic.image_root name the evaluation set "
                                 "(see datasets/README.md, 'Panoptic benchmarks')")
            self.gt_json, self.gt_dir, self.gt_images = Path(pan.gt_json), Path(pan.gt_dir), Path(pan.image_root)
            self.semantic_gt = Path(pan.semantic_gt_dir) if pan.semantic_gt_dir else None
        self.num_things = int(cfg.u2seg.num_clusters)
        self.num_stuff = int(cfg.stego.num_clusters)

    # ------------------------------------------------------------------------------------- paths
    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def maskcut_labels(self) -> Path:
        return self.path("labels", "maskcut.json")

    def thing_labels(self) -> Path:
        return self.labels(0)

    def labels(self, r: int) -> Path:
        """The instance labels of round ``r``: only round 0 here, the thing clusters."""
        return self.path("labels", f"round{r}.json")

    def weights(self) -> Path:
        return self.path("train", "model_final.pth")

    def stego_config(self):
        overrides = [f"stego.out_dir={_q(self.path('stego'))}"]
        c = OmegaConf.merge(self.cfg, OmegaConf.from_dotlist(overrides))
        return c.stego

    def detector_config(self) -> DictConfig:
        from cutler.config import load_config

        p = self.cfg.pipeline
        train = f"{self.path('panoptic_labels', 'instances.json')}@{self.train_images}"
        overrides = [f"datasets.root={_q(self.datasets_root)}", f"datasets.train=[{_q(train)}]", "datasets.test=[]",
                     f"output_dir={_q(self.path('train'))}", "test.eval_period=0",
                     f"model.roi_heads.num_classes={self.num_things}",
                     f"model.sem_seg_head.num_classes={self.num_stuff + 1}"]
        if int(self.cfg.seed) >= 0:
            overrides.append(f"seed={int(self.cfg.seed)}")
        return load_config(p.detector_config, overrides + list(p.detector_overrides))

    # ----------------------------------------------------------------------------------- stages
    def maskcut_config(self) -> DictConfig:
        from cutler.config import load_config

        p = self.cfg.pipeline
        overrides = [f"maskcut.out_dir={_q(self.path('maskcut'))}", f"seed={max(int(self.cfg.seed), 0)}"]
        return load_config(p.maskcut_config, overrides + list(p.maskcut_overrides))

    def stages(self) -> List[Stage]:
        st: List[Stage] = []
        p = self.cfg.pipeline
        if self.embedded:
            st.append(Stage("data", self._run_data, outputs={"train": str(self.train_json), "gt": str(self.gt_json)},
                            description="generate the synthetic panoptic train and val sets",
                            config={"num_train": p.num_synthetic_train, "num_val": p.num_synthetic_val}))
        from .pipeline import label_stages

        stego_final = self.path("stego", "stego_final.pth")
        st.append(Stage("maskcut", self._run_maskcut, inputs={"images": str(self.train_images)},
                        outputs={"labels": str(self.maskcut_labels())},
                        config=OmegaConf.to_container(self.maskcut_config().maskcut),
                        description="MaskCut pseudo-masks on the training images"))
        st += label_stages(self)  # embed, cluster: U2Seg's thing clusters, written to labels(0)
        st += [
            Stage("stego_train", self._run_stego_train, inputs={"images": str(self.train_images)},
                  outputs={"model": str(stego_final)},
                  description=f"STEGO head and a {self.num_stuff}-cluster probe on frozen DINO features"),
            Stage("stego_infer", self._run_stego_infer, inputs={"model": str(stego_final)},
                  outputs={"summary": str(self.path("stego", "infer_done.json"))},
                  description="stuff labels of the training images"),
            Stage("panoptic_labels", self._run_panoptic_labels,
                  inputs={"things": str(self.thing_labels()), "stuff": str(self.path("stego", "infer_done.json"))},
                  outputs={"instances": str(self.path("panoptic_labels", "instances.json"))},
                  config={"max_stuff_thing_overlap": float(self.cfg.panoptic.max_stuff_thing_overlap)},
                  description="panoptic pseudo-labels: things, then stuff, else void"),
            Stage("train", self._run_train, inputs={"labels": str(self.path("panoptic_labels", "instances.json"))},
                  outputs={"weights": str(self.weights())}, config={"config_file": p.detector_config},
                  description="the universal model (semantic branch + cascade) on the pseudo-labels"),
            Stage("eval", self._run_eval, inputs={"weights": str(self.weights()), "gt": str(self.gt_json)},
                  outputs={"metrics": str(self.path("eval", "metrics.json"))},
                  description="panoptic inference, cluster matching, PQ / SQ / RQ (and PixelAcc / mIoU)"),
            Stage("report", self._run_report, inputs={"metrics": str(self.path("eval", "metrics.json"))},
                  outputs={"report": str(self.path("report", "report.md"))},
                  description="published rows next to ours, panoptic overlays"),
        ]
        return st

    # ------------------------------------------------------------------------------- stage work
    def _run_data(self) -> Dict[str, Any]:
        from cutler.data.synthetic import ensure_synthetic_panoptic_dataset

        p = self.cfg.pipeline
        splits = ensure_synthetic_panoptic_dataset(self.datasets_root, p.num_synthetic_train, p.num_synthetic_val,
                                                   seed=max(int(self.cfg.seed), 0))
        return {k: len(json.loads(v.json_file.read_text())["images"]) for k, v in splits.items()}

    def _records(self):
        return training_records(self.train_json, self.train_images)

    def _run_maskcut(self) -> Dict[str, Any]:
        return run_maskcut_stage(self, "cluster")

    def _run_stego_train(self) -> Dict[str, Any]:
        from cutler.utils.seed import seed_everything

        from .stego_run import train_stego

        seed_everything(max(int(self.cfg.seed), 0))
        return train_stego(self.stego_config(), self._records())

    def _run_stego_infer(self) -> Dict[str, Any]:
        from cutler.utils.seed import seed_everything

        from .stego_run import infer_stego

        seed_everything(max(int(self.cfg.seed), 0))  # the same random ViT as the training stage
        summary = infer_stego(self.stego_config(), self._records())
        atomic_write_json(self.path("stego", "infer_done.json"), summary, indent=1)
        return {k: summary[k] for k in ("processed", "failed", "skipped_already_done")}

    def _run_panoptic_labels(self) -> Dict[str, Any]:
        from .panoptic import make_panoptic_labels

        counts = make_panoptic_labels(self.thing_labels(), self.path("stego", "labels"), self.path("panoptic_labels"),
                                      self.num_things, self.num_stuff,
                                      float(self.cfg.panoptic.max_stuff_thing_overlap))
        if not counts["complete"]:
            raise RuntimeError("panoptic pseudo-labels are incomplete")
        return counts

    def _run_train(self) -> Dict[str, Any]:
        from cutler.engine import train

        dcfg = self.detector_config()
        train(dcfg, resume=True)
        last = {}
        metrics = Path(dcfg.output_dir) / "metrics.jsonl"
        for line in metrics.read_text().splitlines() if metrics.is_file() else []:
            rec = json.loads(line)
            if "total_loss" in rec:
                last = {"iteration": rec["iteration"], "total_loss": rec["total_loss"],
                        "loss_sem_seg": rec.get("loss_sem_seg")}
        return last

    def _model(self):
        from cutler.modeling.build import build_model_with_weights

        dcfg = self.detector_config()
        return build_model_with_weights(dcfg, self.weights(), "shapes").eval(), dcfg

    def _run_eval(self) -> Dict[str, Any]:
        from .panoptic import load_panoptic_json
        from .panoptic_eval import evaluate_panoptic, predict_panoptic, semantic_from_predictions

        model, dcfg = self._model()
        gt = load_panoptic_json(self.gt_json)
        pred = self.path("eval", "predictions")
        predict_panoptic(model, gt["images"], self.gt_images, pred, self.num_things, int(dcfg.input.min_size_test),
                         int(dcfg.input.max_size_test), int(dcfg.test.detections_per_image))
        pan = self.cfg.panoptic
        res = evaluate_panoptic(pred, self.gt_json, self.gt_dir, self.num_things, float(pan.match_conf),
                                float(pan.match_iou))
        if self.semantic_gt is not None:
            res["semantic"] = semantic_from_predictions(pred, gt, self.semantic_gt, self.num_things + self.num_stuff)
        atomic_write_json(self.path("eval", "metrics.json"), res, indent=1)
        out = {k: round(res[k], 2) for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")}
        if "semantic" in res:
            out.update({k: round(res["semantic"][k], 2) for k in ("PixelAcc", "mIoU")})
        return out

    def _run_report(self) -> Dict[str, Any]:
        from cutler.evaluation.demo import run_demo

        from .panoptic_eval import panoptic_report

        res = json.loads(self.path("eval", "metrics.json").read_text())
        bench = self.cfg.panoptic.benchmark
        text = "# U2Seg panoptic run\n\n" + panoptic_report(res, bench, "cutler (this run)")
        if "semantic" in res:
            text += (f"\nSemantic reading (Hungarian-matched): PixelAcc {res['semantic']['PixelAcc']:.1f}, "
                     f"mIoU {res['semantic']['mIoU']:.1f}\n")
        if self.embedded:
            text += ("\nThe embedded run trains from random weights on a few synthetic images: its numbers show the "
                     "machinery works, they are not comparable with the published rows.\n")
        atomic_write_text(self.path("report", "report.md"), text)
        model, dcfg = self._model()
        images = json.loads(self.gt_json.read_text())["images"][: int(self.cfg.pipeline.num_overlays)]
        run_demo(model, [str(self.gt_images / im["file_name"]) for im in images], self.path("overlays"),
                 int(dcfg.input.min_size_test), int(dcfg.input.max_size_test))
        return {"report": str(self.path("report", "report.md"))}


def panoptic_summary(data: Dict[str, Any]) -> List[str]:
    """Lines for the console: the eval stage's metrics."""
    rec = data["stages"].get("eval", {})
    if rec.get("status") != "done":
        return []
    return ["panoptic: " + ", ".join(f"{k} {v:.1f}" for k, v in rec.get("metrics", {}).items())]


__all__ = ["PanopticPipelinePlan", "panoptic_summary"]
