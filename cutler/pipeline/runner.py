"""From raw images to an evaluated detector in one command.

Stages (each resumable, recorded in ``run_dir/manifest.json``, runnable alone with ``--stage``):

    data        (embedded default only) generate the synthetic train / held-out val sets
    maskcut     MaskCut pseudo-masks on the training images -> labels/round0.json
    train_r0    round 0: the detector recipe (DropLoss, copy-paste) on the MaskCut masks
    eval_r0     class-agnostic AP/AR on the held-out datasets, overlay pictures
    predict_r0  the round-0 detector over the training images
    merge_r1    confident predictions + surviving previous masks -> labels/round1.json
    train_r1    round 1: initialised from round 0, no DropLoss, copy-paste U(0.5, 1)
    ...         (eval, predict, merge, train for every self-training round)
    report      Markdown + PNG plot of per-round pseudo-label counts and AP

With ``pipeline.variant=u2seg`` (U2Seg, :mod:`cutler.u2seg.pipeline`), MaskCut writes labels/maskcut.json,
``embed`` and ``cluster`` turn it into labels/round0.json with cluster ids as categories, the rounds are
class-aware, predictions keep their cluster ids through the merge, and evaluation adds the matched metrics.

Data and weights: with ``pipeline.train_images`` empty, the synthetic dataset is generated under
``run_dir/datasets`` and every network starts from random weights (or ``maskcut.pretrain_path`` /
``model.weights`` when given), so the whole loop runs anywhere, CPU included.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from cutler.config import load_config
from cutler.utils.io import atomic_write_json, atomic_write_text
from cutler.utils.logging import get_logger

from .report import write_report
from .stages import Stage

logger = get_logger(__name__)


def _q(value: str) -> str:
    """Quote a string for a Hydra override value (paths may hold characters the grammar reserves)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def training_records(train_json: Optional[Path], train_images: Path) -> list:
    """The training images as MaskCut records: the images of the COCO file ``train_json`` (file names under
    ``train_images``), or with ``train_json`` None every image of the folder ``train_images``."""
    from cutler.maskcut.dataset import list_dataset

    if train_json is not None:
        return list_dataset(str(train_json), str(train_images))[0]
    return list_dataset(str(train_images), None)[0]


def run_maskcut_stage(plan: Any, purpose: str) -> Dict[str, Any]:
    """The ``maskcut`` stage of a pipeline plan (this module's or the U2Seg panoptic one): MaskCut over the
    plan's training images, merged into ``plan.maskcut_labels()``; returns the stage's metrics.

    Raises:
        RuntimeError: MaskCut produced no pseudo-mask at all (nothing to ``purpose``).
    """
    from cutler.maskcut.pipeline import run_maskcut
    from cutler.maskcut.writer import merge_outputs
    from cutler.utils.seed import seed_everything

    mcfg = plan.maskcut_config()
    seed_everything(max(int(plan.cfg.seed), 0))  # random-init ViT weights are the same on every rerun
    source = str(plan.train_json if plan.train_json is not None else plan.train_images)
    records = training_records(plan.train_json, plan.train_images)
    summary = run_maskcut(mcfg.maskcut, records, mcfg.maskcut.out_dir, 0, 1, None, progress=True)
    counts = merge_outputs(mcfg.maskcut.out_dir, plan.maskcut_labels(), output_format=mcfg.maskcut.output_format)
    if counts["annotations"] == 0:
        raise RuntimeError(f"MaskCut produced no pseudo-masks on {source}: nothing to {purpose} "
                           f"(summary: {summary.get('failures_by_reason')})")
    return {"images": summary.get("processed", 0) + summary.get("skipped_already_done", 0),
            "failed": summary.get("failed", 0), "pseudo_masks": counts["annotations"],
            "img_per_s": summary.get("img_per_s")}


class PipelinePlan:
    """Paths and configs of one pipeline run, and its list of :class:`Stage`."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        p = cfg.pipeline
        self.run_dir = Path(p.run_dir).resolve()
        self.embedded = not p.train_images
        self.datasets_root = (self.run_dir / "datasets") if self.embedded else Path(cfg.datasets.root).resolve()
        if self.embedded:
            split = self.datasets_root / "synthetic" / "train"
            self.train_json: Optional[Path] = split / "annotations.json"
            self.train_images = split / "images"
        elif str(p.train_images).endswith(".json"):
            self.train_json = Path(p.train_images).resolve()
            self.train_images = Path(p.train_image_root or self.train_json.parent).resolve()
        else:
            self.train_json = None
            self.train_images = Path(p.train_images).resolve()
        self.rounds = int(cfg.selftrain.rounds)
        thresholds = list(cfg.selftrain.score_thresholds)
        if self.rounds > 0 and len(thresholds) < self.rounds:
            raise ValueError(f"selftrain.score_thresholds has {len(thresholds)} values for {self.rounds} rounds; "
                             "give one threshold per self-training round")
        self.thresholds = thresholds
        if p.variant not in ("cutler", "u2seg"):
            raise ValueError(f"pipeline.variant={p.variant!r}; choose 'cutler' or 'u2seg'")
        self.u2seg = p.variant == "u2seg"

    # ------------------------------------------------------------------------------------- paths
    @property
    def round0_stage(self) -> str:
        """The stage that writes round 0's labels."""
        return "cluster" if self.u2seg else "maskcut"

    def labels(self, r: int) -> Path:
        return self.run_dir / "labels" / f"round{r}.json"

    def maskcut_labels(self) -> Path:
        """MaskCut's merged output: round 0's labels, or (U2Seg) the masks to be clustered."""
        return self.run_dir / "labels" / "maskcut.json" if self.u2seg else self.labels(0)

    def weights(self, r: int) -> Path:
        return self.run_dir / f"round{r}" / "train" / "model_final.pth"

    def predictions(self, r: int) -> Path:
        return self.run_dir / f"round{r}" / "predict" / "coco_instances_results.json"

    def eval_dir(self, r: int) -> Path:
        return self.run_dir / f"round{r}" / "eval"

    # ----------------------------------------------------------------------------------- configs
    def maskcut_config(self) -> DictConfig:
        p = self.cfg.pipeline
        overrides = [f"maskcut.out_dir={_q(self.run_dir / 'maskcut')}", f"seed={max(int(self.cfg.seed), 0)}"]
        return load_config(p.maskcut_config, overrides + list(p.maskcut_overrides))

    def round_config(self, r: int) -> DictConfig:
        """The detector config of round ``r`` (round 0: the recipe; later: the self-training changes)."""
        p = self.cfg.pipeline
        train_name = f"{self.labels(r)}@{self.train_images}"
        overrides = [f"datasets.root={_q(self.datasets_root)}", f"datasets.train=[{_q(train_name)}]",
                     f"datasets.test=[{','.join(_q(d) for d in p.eval_datasets)}]",
                     f"output_dir={_q(self.run_dir / f'round{r}' / 'train')}", "test.eval_period=0"]
        if int(self.cfg.seed) >= 0:
            overrides.append(f"seed={int(self.cfg.seed) + r}")
        if self.u2seg:
            from cutler.u2seg.pipeline import detector_overrides

            overrides += detector_overrides(self.cfg)
        overrides += list(p.detector_overrides)
        if r > 0:
            overrides += list(p.selftrain_overrides) + [f"model.weights={_q(self.weights(r - 1))}"]
            if p.selftrain_max_iter > 0:
                overrides += [f"solver.max_iter={p.selftrain_max_iter}", f"solver.steps=[{p.selftrain_max_iter}]"]
        return load_config(p.detector_config, overrides)

    # ------------------------------------------------------------------------------------ stages
    def stages(self) -> List[Stage]:
        st: List[Stage] = []
        if self.embedded:
            st.append(Stage("data", self._run_data, outputs={"train": str(self.train_json)},
                            description="generate the synthetic train and held-out val sets",
                            config={"num_train": self.cfg.pipeline.num_synthetic_train,
                                    "num_val": self.cfg.pipeline.num_synthetic_val}))
        inputs = {"images": str(self.train_images)}
        st.append(Stage("maskcut", self._run_maskcut, inputs=inputs, outputs={"labels": str(self.maskcut_labels())},
                        description="MaskCut pseudo-masks on the training images",
                        config=OmegaConf.to_container(self.maskcut_config().maskcut)))
        if self.u2seg:
            from cutler.u2seg.pipeline import label_stages

            st += label_stages(self)
        for r in range(self.rounds + 1):
            if r > 0:
                st.append(Stage(f"predict_r{r - 1}", lambda r=r: self._run_predict(r - 1),
                                inputs={"weights": str(self.weights(r - 1)), "labels": str(self.labels(r - 1))},
                                outputs={"predictions": str(self.predictions(r - 1))},
                                description=f"round-{r - 1} detector over the training images"))
                st.append(Stage(f"merge_r{r}", lambda r=r: self._run_merge(r),
                                inputs={"labels": str(self.labels(r - 1)), "predictions": str(self.predictions(r - 1))},
                                outputs={"labels": str(self.labels(r))},
                                config={"score_thresh": self.thresholds[r - 1],
                                        "drop_iou_thresh": float(self.cfg.selftrain.drop_iou_thresh)},
                                description=f"round-{r} labels: predictions >= {self.thresholds[r - 1]} "
                                            "+ surviving masks"))
            train_inputs = {"labels": str(self.labels(r))}
            if r > 0:
                train_inputs["init"] = str(self.weights(r - 1))
            rcfg = self.round_config(r)
            st.append(Stage(f"train_r{r}", lambda r=r: self._run_train(r), inputs=train_inputs,
                            outputs={"weights": str(self.weights(r))},
                            config={"config_file": self.cfg.pipeline.detector_config,
                                    "max_iter": int(rcfg.solver.max_iter),
                                    "use_droploss": bool(rcfg.model.roi_heads.use_droploss),
                                    "copy_paste_min_ratio": float(rcfg.dataloader.copy_paste_min_ratio)},
                            description=f"train round {r}" + (" (DropLoss, copy-paste)" if r == 0 else
                                                              f" from round {r - 1}")))
            st.append(Stage(f"eval_r{r}", lambda r=r: self._run_eval(r), inputs={"weights": str(self.weights(r))},
                            outputs={"metrics": str(self.eval_dir(r) / "metrics.json")},
                            description=f"evaluate round {r} on {', '.join(self.cfg.pipeline.eval_datasets)}"))
        st.append(Stage("report", self._run_report,
                        inputs={"metrics": str(self.eval_dir(self.rounds) / "metrics.json")},
                        outputs={"report": str(self.run_dir / "report" / "report.md")},
                        description="per-round pseudo-label counts and AP (Markdown + plot)"))
        return st

    # ---------------------------------------------------------------------------------- stage work
    def _run_data(self) -> Dict[str, Any]:
        from cutler.data.synthetic import ensure_synthetic_dataset

        p = self.cfg.pipeline
        splits = ensure_synthetic_dataset(self.datasets_root, p.num_synthetic_train, p.num_synthetic_val,
                                          seed=max(int(self.cfg.seed), 0))
        return {split: len(json.loads(paths.json_file.read_text())["images"]) for split, paths in splits.items()}

    def _run_maskcut(self) -> Dict[str, Any]:
        return run_maskcut_stage(self, "cluster" if self.u2seg else "train on")

    def _run_train(self, r: int) -> Dict[str, Any]:
        rcfg = self.round_config(r)
        train_round(rcfg, int(self.cfg.pipeline.num_gpus))
        return _last_losses(Path(rcfg.output_dir) / "metrics.jsonl")

    def _load_model(self, r: int):
        from cutler.modeling.build import build_model_with_weights

        rcfg = self.round_config(r)
        return build_model_with_weights(rcfg, self.weights(r), "shapes").eval(), rcfg

    def _run_eval(self, r: int) -> Dict[str, Any]:
        if self.u2seg:  # class-aware predictions: matched and class-agnostic metrics from one inference pass
            from cutler.u2seg.evaluation import evaluate_dataset
        else:
            from cutler.evaluation.evaluator import evaluate_dataset

        model, rcfg = self._load_model(r)
        results = {}
        for name in self.cfg.pipeline.eval_datasets:
            metrics = evaluate_dataset(model, rcfg, name, output_dir=self.eval_dir(r) / name,
                                       root=self.datasets_root)
            results[name] = metrics
        self._write_overlays(model, rcfg, r)
        atomic_write_json(self.eval_dir(r) / "metrics.json", results, indent=1)
        summary = {}
        for name, m in results.items():
            for iou_type, values in m.items():
                for key in ("AP", "AP50", "AR100"):
                    if key in values:
                        summary[f"{name}/{iou_type}/{key}"] = values[key]
        logger.info("round %d: %s", r, ", ".join(f"{k} {v:.1f}" for k, v in summary.items()))
        return summary

    def _write_overlays(self, model, rcfg, r: int) -> None:
        from cutler.data.catalog import get_dataset
        from cutler.evaluation.demo import run_demo

        p = self.cfg.pipeline
        if p.num_overlays <= 0 or not p.eval_datasets:
            return
        ds = get_dataset(p.eval_datasets[0], self.datasets_root)
        images = json.loads(ds.json_file.read_text())["images"][: p.num_overlays]
        paths = [str(ds.image_root / im["file_name"]) for im in images]
        run_demo(model, paths, self.run_dir / "overlays" / f"round{r}", min_size=int(rcfg.input.min_size_test),
                 max_size=int(rcfg.input.max_size_test), confidence=float(p.overlay_score_thresh))

    def _run_predict(self, r: int) -> Dict[str, Any]:
        from cutler.evaluation.inference import run_inference

        model, rcfg = self._load_model(r)
        images = json.loads(self.labels(r).read_text())["images"]
        out = run_inference(model, images, self.train_images, self.predictions(r).parent,
                            min_size=int(rcfg.input.min_size_test), max_size=int(rcfg.input.max_size_test),
                            batch_size=int(rcfg.eval.batch_size), num_workers=0,
                            max_dets=int(rcfg.test.detections_per_image), with_masks=True, class_aware=self.u2seg,
                            resume=True)
        if out is None or not Path(out).is_file():
            raise RuntimeError(f"inference over the training images did not finish (see {self.predictions(r).parent})")
        if Path(out) != self.predictions(r):
            os.replace(out, self.predictions(r))
        return {"images": len(images)}

    def _run_merge(self, r: int) -> Dict[str, Any]:
        from cutler.selftrain.merge import merge_self_training_labels

        stats = merge_self_training_labels(self.labels(r - 1), self.predictions(r - 1), self.labels(r),
                                           score_thresh=self.thresholds[r - 1],
                                           drop_iou_thresh=float(self.cfg.selftrain.drop_iou_thresh),
                                           keep_categories=self.u2seg)
        return {"pseudo_masks": stats.annotations, **stats.as_dict()}

    def _run_report(self) -> Dict[str, Any]:
        from .stages import Manifest

        counts = pseudo_mask_counts(Manifest(self.run_dir).data, self.rounds, self.round0_stage)
        rows = []
        for r in range(self.rounds + 1):
            metrics = json.loads((self.eval_dir(r) / "metrics.json").read_text())
            rows.append({"round": r, "pseudo_masks": counts[r], "metrics": metrics})
        path = write_report(rows, self.run_dir / "report", self.cfg.pipeline.eval_datasets)
        return {"report": str(path)}


def train_round(rcfg: DictConfig, num_gpus: int) -> None:
    """Train the detector of the round config ``rcfg`` into ``rcfg.output_dir`` on ``num_gpus`` processes,
    resuming from its last checkpoint (a killed round continues where it stopped)."""
    from cutler.engine import launch, train

    if num_gpus > 1:
        launch(_train_entry, num_gpus, args=(OmegaConf.to_container(rcfg),))
    else:
        train(rcfg, resume=True)


def _train_entry(cfg_container: dict) -> None:
    """Spawned-process entry for multi-process training (configs travel as plain containers)."""
    from cutler.engine import train

    train(OmegaConf.create(cfg_container), resume=True)


def pseudo_mask_counts(manifest_data: Dict[str, Any], rounds: int, round0_stage: str = "maskcut"
                       ) -> List[Optional[int]]:
    """Pseudo-masks each round trained on, as recorded by the stages that wrote the label files
    (``round0_stage``, ``maskcut`` or U2Seg's ``cluster``, for round 0; ``merge_rR`` after), so no multi-GB
    label JSON is read again to count; None for a round whose labels do not exist yet."""
    names = [round0_stage] + [f"merge_r{r}" for r in range(1, rounds + 1)]
    return [manifest_data["stages"].get(n, {}).get("metrics", {}).get("pseudo_masks") for n in names]


def _last_losses(metrics_file: Path) -> Dict[str, float]:
    """The last logged total loss (and its iteration) from a trainer's metrics.jsonl."""
    if not metrics_file.is_file():
        return {}
    last: Dict[str, float] = {}
    for line in metrics_file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "total_loss" in rec:
            last = {"iteration": rec.get("iteration"), "total_loss": rec["total_loss"]}
    return last


def save_run_config(plan: PipelinePlan) -> None:
    """Keep the resolved pipeline config beside the manifest."""
    atomic_write_text(plan.run_dir / "pipeline_config.yaml", OmegaConf.to_yaml(plan.cfg, resolve=True))
