"""The UnSAM variant of the pipeline runner (``pipeline.variant=unsam``).

Stages (one manifest, each resumable and runnable alone with ``--stage``):

    data             (embedded default only) the synthetic_parts train / held-out val sets
    maskcut          \\  only without unsam.divide.weights: MaskCut pseudo-masks and a CutLER round 0,
    detector_r0      /  the detector the divide step uses
    divide_conquer   hierarchical pseudo-masks of the training images -> segmenter/labels/round0.json
    pseudo_eval      (training images with ground truth) AR of the pseudo-masks alone
    train_r0         the whole-image segmenter (unsam.learn) on the pseudo-masks
    eval_r0          mask AR (up to unsam.max_dets detections) on pipeline.eval_datasets
    predict_r0 / merge_r1 / train_r1 / eval_r1   one self-training round with the CutLER merge rule
    report           pseudo-mask and segmenter AR next to the published rows, hierarchy pictures

The segmenter rounds are :class:`cutler.pipeline.runner.PipelinePlan` rounds on another run folder
(``run_dir/segmenter``) whose round-0 labels are the divide-and-conquer output, and whose training and loading
go through :mod:`cutler.unsam.segmenter` so another mask head can replace the Cascade Mask R-CNN.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import DictConfig, OmegaConf

from ..pipeline.runner import PipelinePlan, _last_losses, training_records
from ..pipeline.stages import Stage
from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.logging import get_logger

logger = get_logger(__name__)


def _derived(cfg: DictConfig, changes: Dict[str, Any]) -> DictConfig:
    """A writable copy of ``cfg`` with dotted-key ``changes`` applied."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in changes.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


class _SegmenterPlan(PipelinePlan):
    """Segmenter rounds: the CutLER round machinery with the segmenter's recipe and the UnSAM labels."""

    def __init__(self, cfg: DictConfig, base: PipelinePlan):
        super().__init__(cfg)
        self.datasets_root, self.train_json, self.train_images = base.datasets_root, base.train_json, base.train_images
        self.embedded = base.embedded
        from .segmenter import get_segmenter

        self.segmenter = get_segmenter(cfg.unsam.learn.segmenter)

    def round_config(self, r: int) -> DictConfig:
        rcfg = super().round_config(r)
        max_dets = int(self.cfg.unsam.max_dets)
        return _derived(rcfg, {"eval.max_dets": max_dets, "unsam.max_dets": max_dets})

    def _run_train(self, r: int) -> Dict[str, Any]:
        rcfg = self.round_config(r)
        self.segmenter.train(rcfg, int(self.cfg.pipeline.num_gpus))
        return _last_losses(Path(rcfg.output_dir) / "metrics.jsonl")

    def _load_model(self, r: int):
        rcfg = self.round_config(r)
        return self.segmenter.build(rcfg, str(self.weights(r))), rcfg

    def _run_eval(self, r: int) -> Dict[str, Any]:
        from ..evaluation.evaluator import evaluate_dataset
        from .evaluation import ar_summary

        model, rcfg = self._load_model(r)
        results = {}
        for name in self.cfg.pipeline.eval_datasets:
            results[name] = evaluate_dataset(model, rcfg, name, output_dir=self.eval_dir(r) / name,
                                             root=self.datasets_root)
        self._write_overlays(model, rcfg, r)
        atomic_write_json(self.eval_dir(r) / "metrics.json", results, indent=1)
        summary = {}
        for name, m in results.items():
            for iou_type in m:
                for key, value in ar_summary(m, iou_type).items():
                    summary[f"{name}/{iou_type}/{key}"] = value
        logger.info("segmenter round %d: %s", r, ", ".join(f"{k} {v:.1f}" for k, v in summary.items()))
        return summary


class UnsamPlan:
    """Paths, configs and stages of one UnSAM pipeline run (see the module docstring)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        u = cfg.unsam
        # the divide detector is a CutLER round 0, the segmenter rounds CutLER rounds on other labels
        detector = PipelinePlan(_derived(cfg, {"selftrain.rounds": 0, "pipeline.variant": "cutler"}))
        if detector.embedded:  # the synthetic scenes with inner parts: a hierarchy exists to be found
            split = detector.datasets_root / "synthetic_parts" / "train"
            detector.train_json, detector.train_images = split / "annotations.json", split / "images"
        self.detector = detector
        self.run_dir = detector.run_dir
        self.embedded = detector.embedded
        rounds = int(u.learn.selftrain_rounds)
        seg_cfg = _derived(cfg, {
            "pipeline.variant": "cutler",
            "pipeline.run_dir": str(self.run_dir / "segmenter"),
            "pipeline.detector_config": u.learn.config,
            "pipeline.detector_overrides": list(u.learn.overrides),
            "pipeline.selftrain_overrides": list(u.learn.selftrain_overrides),
            "pipeline.selftrain_max_iter": int(u.learn.selftrain_max_iter),
            "selftrain.rounds": rounds,
            "selftrain.score_thresholds": [float(u.learn.selftrain_score_thresh)] * rounds,
            "selftrain.drop_iou_thresh": float(u.learn.selftrain_drop_iou),
        })
        self.segmenter = _SegmenterPlan(seg_cfg, detector)
        self.rounds = rounds

    # ------------------------------------------------------------------------------------- paths
    @property
    def divide_weights(self) -> Path:
        given = self.cfg.unsam.divide.weights
        return Path(given).resolve() if given else self.detector.weights(0)

    @property
    def labels(self) -> Path:
        return self.segmenter.labels(0)

    @property
    def pseudo_eval_file(self) -> Path:
        return self.run_dir / "divide_conquer" / "pseudo_eval.json"

    def unsam_config(self) -> DictConfig:
        """``cfg.unsam`` with the divide weights of this run and the output folder under ``run_dir``; a divide
        detector trained by this run is built from the recipe that trained it (``pipeline.detector_config``)."""
        changes: Dict[str, Any] = {"unsam.divide.weights": str(self.divide_weights),
                                   "unsam.out_dir": str(self.run_dir / "divide_conquer")}
        if not self.cfg.unsam.divide.weights:
            changes["unsam.divide.detector_config"] = self.cfg.pipeline.detector_config
            changes["unsam.divide.detector_overrides"] = list(self.cfg.pipeline.detector_overrides)
        return _derived(self.cfg, changes).unsam

    # ------------------------------------------------------------------------------------ stages
    def stages(self) -> List[Stage]:
        st: List[Stage] = []
        det = {s.name: s for s in self.detector.stages()}
        if self.embedded:
            p = self.cfg.pipeline
            st.append(Stage("data", self._run_data, outputs={"train": str(self.detector.train_json)},
                            description="generate the synthetic_parts train and held-out val sets",
                            config={"num_train": p.num_synthetic_train, "num_val": p.num_synthetic_val}))
        if not self.cfg.unsam.divide.weights:
            st.append(det["maskcut"])
            st.append(dataclasses.replace(det["train_r0"], name="detector_r0",
                                          description="train the divide detector (CutLER round 0)"))
        u = self.cfg.unsam
        st.append(Stage("divide_conquer", self._run_divide_conquer,
                        inputs={"images": str(self.detector.train_images), "weights": str(self.divide_weights)},
                        outputs={"labels": str(self.labels)},
                        config=OmegaConf.to_container(u, resolve=True),
                        description="divide-and-conquer hierarchical pseudo-masks of the training images"))
        if self.detector.train_json is not None:
            st.append(Stage("pseudo_eval", self._run_pseudo_eval, inputs={"labels": str(self.labels)},
                            outputs={"metrics": str(self.pseudo_eval_file)},
                            description="AR of the pseudo-masks against the training images' ground truth"))
        for s in self.segmenter.stages():
            if s.name in ("data", "maskcut", "report"):
                continue
            r = s.name.rsplit("_r", 1)[-1]
            described = {"train": f"train the segmenter, round {r}" + (" (on the pseudo-masks)" if r == "0" else
                                                                       f" (from round {int(r) - 1})"),
                         "eval": f"mask AR of segmenter round {r} on {', '.join(self.cfg.pipeline.eval_datasets)}",
                         "predict": f"segmenter round {r} over the training images"}
            st.append(dataclasses.replace(s, description=described.get(s.name.split("_")[0], s.description)))
        st.append(Stage("report", self._run_report,
                        inputs={"metrics": str(self.segmenter.eval_dir(self.rounds) / "metrics.json")},
                        outputs={"report": str(self.run_dir / "report" / "report.md")},
                        description="pseudo-mask and segmenter AR next to the published rows, hierarchy pictures"))
        return st

    # -------------------------------------------------------------------------------- stage work
    def _run_data(self) -> Dict[str, Any]:
        from ..data.synthetic import ensure_synthetic_dataset

        p = self.cfg.pipeline
        splits = ensure_synthetic_dataset(self.detector.datasets_root, p.num_synthetic_train, p.num_synthetic_val,
                                          seed=max(int(self.cfg.seed), 0), parts=True)
        return {split: len(json.loads(paths.json_file.read_text())["images"]) for split, paths in splits.items()}

    def _run_divide_conquer(self) -> Dict[str, Any]:
        from ..maskcut.writer import merge_outputs
        from ..utils.seed import seed_everything
        from .divide_conquer import run_divide_conquer

        ucfg = self.unsam_config()
        seed_everything(max(int(self.cfg.seed), 0))  # random-init ViT weights are the same on every rerun
        d = self.detector
        source = str(d.train_json if d.train_json is not None else d.train_images)
        records = training_records(d.train_json, d.train_images)
        summary = run_divide_conquer(ucfg, records, ucfg.out_dir, 0, 1, progress=True)
        counts = merge_outputs(ucfg.out_dir, self.labels, info={"description": "UnSAM divide-and-conquer "
                                                                              "pseudo-masks (cutler)"})
        if counts["annotations"] == 0:
            raise RuntimeError(f"divide-and-conquer produced no pseudo-masks on {source} (divide masks with score > "
                               f"{ucfg.divide.score_thresh}: {summary['counts'].get('divide', 0)}; failures: "
                               f"{summary.get('failures_by_reason')}); nothing to train on")
        per_level = {k: v for k, v in sorted(summary["counts"].items()) if k.startswith("level_")}
        images = summary["processed"] + summary["skipped_already_done"]
        return {"images": images, "failed": summary["failed"], "pseudo_masks": counts["annotations"],
                "masks_per_image": counts["annotations"] / max(counts["images"], 1), **per_level,
                "img_per_s": summary["img_per_s"]}

    def _run_pseudo_eval(self) -> Dict[str, Any]:
        from .evaluation import evaluate_pseudo_masks

        gt = json.loads(self.detector.train_json.read_text())
        if not gt.get("annotations"):
            result: Dict[str, Any] = {"skipped": f"{self.detector.train_json} has no annotations"}
        else:
            result = evaluate_pseudo_masks(self.labels, gt, max_dets=int(self.cfg.unsam.max_dets))
        atomic_write_json(self.pseudo_eval_file, result, indent=1)
        return result.get("ar", result)

    def _run_report(self) -> Dict[str, Any]:
        from ..evaluation.report import markdown_table
        from ..pipeline.report import line_plot
        from ..pipeline.stages import Manifest
        from ..utils.visualization import save_rgb_png
        from .evaluation import ar_summary, pseudo_table, segmenter_table
        from .visualize import draw_hierarchies_from_json

        out = self.run_dir / "report"
        stages = Manifest(self.run_dir).data["stages"]
        max_dets = int(self.cfg.unsam.max_dets)
        dc = stages.get("divide_conquer", {}).get("metrics", {})
        text = ["# UnSAM pipeline report", ""]
        text += ["## Pseudo-masks", "",
                 f"{dc.get('pseudo_masks', '?')} hierarchical pseudo-masks on {dc.get('images', '?')} images "
                 f"({dc.get('masks_per_image', math.nan):.1f} per image; the published pipeline: 334 per SA-1B "
                 "image). Per level (0 = divide masks, 1 = coarsest merge):", ""]
        levels = sorted((k for k in dc if k.startswith("level_")), key=lambda k: int(k.split("_")[1]))
        text += [markdown_table(["level"] + [k.split("_")[1] for k in levels], [["masks"] + [dc[k] for k in levels]]), ""]
        pseudo = json.loads(self.pseudo_eval_file.read_text()) if self.pseudo_eval_file.is_file() else None
        ours = pseudo.get("ar") if pseudo and "ar" in pseudo else None
        text += [f"Pseudo-masks alone against the training images' ground truth (ours) and the published rows "
                 f"(1000 held-out SA-1B images), AR with up to {max_dets} masks per image:", "",
                 markdown_table(*pseudo_table(ours, max_dets)), ""]
        rows, ar_series = [], {}
        names = list(self.cfg.pipeline.eval_datasets)
        for r in range(self.rounds + 1):
            metrics = json.loads((self.segmenter.eval_dir(r) / "metrics.json").read_text())
            count = stages.get("divide_conquer" if r == 0 else f"merge_r{r}", {}).get("metrics", {}).get("pseudo_masks")
            row: List[Any] = [r, count]
            for name in names:
                ar = ar_summary(metrics.get(name, {}), "segm" if "segm" in metrics.get(name, {}) else "bbox")
                row += [ar[k] for k in ("AR", "ARs", "ARm", "ARl")]
                ar_series.setdefault(f"{name} AR{max_dets}", []).append(ar["AR"])
            rows.append(row)
        header = ["round", "labels"] + [f"{n} {k}" for n in names for k in (f"AR{max_dets}", "ARs", "ARm", "ARl")]
        text += ["## Whole-image segmenter", "",
                 f"Class-agnostic mask AR (%, up to {max_dets} detections) after each round on the held-out sets:", "",
                 markdown_table(header, rows), ""]
        from .evaluation import BENCHMARKS

        bench = {}
        last = json.loads((self.segmenter.eval_dir(self.rounds) / "metrics.json").read_text())
        for label, catalog in BENCHMARKS:
            for name in catalog:
                if name in last:
                    bench[label] = ar_summary(last[name], "segm" if "segm" in last[name] else "bbox")
        text += ["Next to the published rows (COCO, LVIS, SA-1B; '-' where not evaluated here):", "",
                 markdown_table(*segmenter_table(bench, max_dets)), ""]
        if ar_series:
            save_rgb_png(out / "ar_per_round.png", line_plot(ar_series, list(range(self.rounds + 1)),
                                                             f"held-out mask AR{max_dets} (%) per round"))
            text += ["![AR per round](ar_per_round.png)", ""]
        pictures = draw_hierarchies_from_json(self.labels, self.detector.train_images, out / "hierarchies",
                                              limit=int(self.cfg.pipeline.num_overlays))
        if pictures:
            text += ["## Hierarchies", ""] + [f"![{p.stem}](hierarchies/{p.name})" for p in pictures] + [""]
        path = out / "report.md"
        atomic_write_text(path, "\n".join(text))
        return {"report": str(path)}

    def summary_lines(self, data: Dict[str, Any]) -> List[str]:
        """What the command line prints after a run: pseudo-mask figures and the AR of every round."""
        stages = data["stages"]
        lines = []
        dc = stages.get("divide_conquer", {})
        if dc.get("status") == "done":
            m = dc["metrics"]
            lines.append(f"pseudo-masks: {m.get('pseudo_masks')} on {m.get('images')} images "
                         f"({m.get('masks_per_image', 0):.1f} per image)")
        pe = stages.get("pseudo_eval", {})
        if pe.get("status") == "done" and "AR" in pe.get("metrics", {}):
            m = pe["metrics"]
            lines.append("pseudo-mask AR vs ground truth: " + ", ".join(f"{k} {m[k]:.1f}" for k in ("AR", "ARs", "ARm",
                                                                                                    "ARl")))
        for r in range(self.rounds + 1):
            rec = stages.get(f"eval_r{r}", {})
            if rec.get("status") == "done":
                metrics = rec["metrics"]
                kind = "/segm/" if any("/segm/" in k for k in metrics) else "/bbox/"
                lines.append(f"segmenter round {r}: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items() if kind in k))
        return lines


__all__ = ["UnsamPlan"]
