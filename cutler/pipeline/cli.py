"""``tools/run_pipeline.py``: parsing, the plan, and running it (the work is in :mod:`.runner`)."""
from __future__ import annotations

import argparse
from typing import Any, Callable, List, Optional, Sequence, Tuple

from cutler.config import add_config_arguments, config_from_args
from cutler.utils.logging import setup_logger

from .runner import PipelinePlan, pseudo_mask_counts, save_run_config
from .stages import Manifest, describe_plan, run_stages


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_pipeline.py",
        description="MaskCut -> round 0 (DropLoss, copy-paste) -> self-training rounds -> zero-shot evaluation, "
                    "resumable. With no data given it runs the whole loop on a generated synthetic dataset with "
                    "random weights (CPU is enough). Keys: pipeline.* (data, configs, run_dir), selftrain.* "
                    "(rounds, score_thresholds), and any maskcut./model./solver. key through the sub-configs' "
                    "pipeline.*_overrides lists.")
    p.add_argument("--dry-run", action="store_true", help="print the plan (what would run or be skipped) and exit")
    p.add_argument("--stage", action="append", default=None, metavar="NAME",
                   help="run only this stage (repeatable); its inputs must exist")
    p.add_argument("--force", action="append", default=[], metavar="NAME", help="rerun this stage even if done")
    add_config_arguments(p, default_config="pipeline/embedded.yaml")
    return p


#: ``pipeline.variant`` values: the CutLER loop, U2Seg (its class-aware rounds, or its panoptic loop), UnSAM.
VARIANTS = ("cutler", "u2seg", "u2seg_panoptic", "unsam")


def make_plan(cfg) -> Tuple[Any, Callable[[dict], List[str]]]:
    """The plan of ``pipeline.variant`` and the function giving its summary lines from the manifest data:
    ``cutler`` / ``u2seg`` (:class:`PipelinePlan`), ``u2seg_panoptic``
    (:class:`cutler.u2seg.panoptic_pipeline.PanopticPipelinePlan`) or ``unsam``
    (:class:`cutler.unsam.pipeline.UnsamPlan`).
    """
    variant = str(cfg.pipeline.variant)
    if variant not in VARIANTS:
        raise ValueError(f"pipeline.variant={variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant == "u2seg_panoptic":
        from cutler.u2seg.panoptic_pipeline import PanopticPipelinePlan, panoptic_summary

        return PanopticPipelinePlan(cfg), panoptic_summary
    if variant == "unsam":
        from cutler.unsam.pipeline import UnsamPlan

        plan = UnsamPlan(cfg)
        return plan, plan.summary_lines
    plan = PipelinePlan(cfg)
    return plan, lambda data: _round_summary(data, plan)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    plan, summarize = make_plan(config_from_args(args))
    return _run(args, plan, summarize)


def _round_summary(data: dict, plan: PipelinePlan) -> list:
    counts = pseudo_mask_counts(data, plan.rounds, plan.round0_stage)
    summary = []
    for r in range(plan.rounds + 1):
        rec = data["stages"].get(f"eval_r{r}", {})
        if rec.get("status") == "done":
            metrics = ", ".join(f"{k} {v:.1f}" for k, v in rec.get("metrics", {}).items())
            summary.append(f"round {r}: {counts[r]} pseudo-masks | {metrics}")
    return summary


def _run(args, plan, summarize) -> dict:
    """Print the plan, run it (unless --dry-run), print ``summarize(manifest data)`` lines and the report path."""
    stages = plan.stages()
    setup_logger(str(plan.run_dir))
    print(f"pipeline run directory: {plan.run_dir}")
    print("\n".join(describe_plan(stages, Manifest(plan.run_dir))))
    if args.dry_run:
        return {}
    save_run_config(plan)
    data = run_stages(stages, plan.run_dir, only=args.stage, force=args.force)
    summary = summarize(data)
    if summary:
        print("\n".join(summary))
    report = plan.run_dir / "report" / "report.md"
    if report.is_file():
        print(f"report: {report}")
    if (plan.run_dir / "overlays").is_dir():
        print(f"overlays: {plan.run_dir / 'overlays'}")
    return data
