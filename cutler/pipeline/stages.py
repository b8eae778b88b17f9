"""A resumable chain of stages with a manifest: what ran, on what, producing what, in how long.

The manifest (``run_dir/manifest.json``, rewritten atomically after every change) records for each
stage its status (``pending`` | ``running`` | ``done`` | ``failed``), inputs, outputs, the config it
ran with, start/end times and duration, and the metrics it returned. A rerun skips stages that are
``done`` and whose outputs still exist, and starts again at the first unfinished one; every stage
after it runs again too, since its inputs may have changed (a stage left ``running`` by a killed
process is redone from its start; stages write their outputs atomically or resume internally).
"""
from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from cutler.utils.io import atomic_write_json
from cutler.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class Stage:
    """One step of the pipeline.

    ``run()`` does the work and returns a dict of metrics (JSON-serialisable); ``outputs`` are the
    paths it must leave behind (checked after it runs and before it is skipped on a rerun).
    """

    name: str
    run: Callable[[], Optional[Dict[str, Any]]]
    inputs: Dict[str, str] = field(default_factory=dict)
    outputs: Dict[str, str] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    description: str = ""


class Manifest:
    """The JSON record of a run directory's stages."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "manifest.json"
        self.data: Dict[str, Any] = {"stages": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path} is not valid JSON ({e}); move it away to start the run afresh") from e

    def stage(self, name: str) -> Dict[str, Any]:
        return self.data["stages"].setdefault(name, {"status": "pending"})

    def save(self) -> None:
        atomic_write_json(self.path, self.data, indent=1)


def _outputs_exist(stage: Stage) -> bool:
    return all(Path(p).exists() for p in stage.outputs.values())


def describe_plan(stages: Sequence[Stage], manifest: Manifest) -> List[str]:
    """One line per stage: what a run would do now (``skip`` or ``run``) and why."""
    lines = []
    rerun_rest = False
    for i, st in enumerate(stages, 1):
        rec = manifest.data["stages"].get(st.name, {})
        done = rec.get("status") == "done" and _outputs_exist(st) and not rerun_rest
        rerun_rest = rerun_rest or not done
        action = "skip (done)" if done else "run"
        outs = ", ".join(f"{k}={v}" for k, v in st.outputs.items())
        lines.append(f"{i:2d}. {st.name:<18} {action:<12} {st.description}" + (f"  -> {outs}" if outs else ""))
    return lines


def run_stages(stages: Sequence[Stage], run_dir: Path, only: Optional[Sequence[str]] = None,
               force: Sequence[str] = ()) -> Dict[str, Any]:
    """Run ``stages`` in order, skipping finished ones, recording everything in the manifest.

    Args:
        stages: the plan.
        run_dir: the run directory (holds ``manifest.json``).
        only: run just these stage names (their inputs must exist); None = all.
        force: stage names to rerun even if done.

    Returns:
        The manifest data.

    Raises:
        Whatever a stage raises, after marking it ``failed`` with the error in the manifest.
    """
    manifest = Manifest(run_dir)
    names = [s.name for s in stages]
    unknown = [n for n in list(only or []) + list(force) if n not in names]
    if unknown:
        raise KeyError(f"unknown stage(s) {unknown}; stages are {names}")
    manifest.data["plan"] = names
    manifest.save()
    rerun_rest = False  # once a stage runs, the ones after it must run on its new outputs
    for st in stages:
        if only is not None and st.name not in only:
            continue
        rec = manifest.stage(st.name)
        if rec.get("status") == "done" and _outputs_exist(st) and st.name not in force and not rerun_rest:
            logger.info(f"[{st.name}] done earlier, skipping")
            continue
        rerun_rest = only is None
        missing = [f"{k}={v}" for k, v in st.inputs.items() if not Path(v).exists()]
        if missing:
            raise FileNotFoundError(f"stage '{st.name}' needs inputs that do not exist: {missing}")
        rec.update(status="running", inputs=st.inputs, outputs=st.outputs, config=st.config,
                   started=time.strftime("%Y-%m-%dT%H:%M:%S"), attempts=rec.get("attempts", 0) + 1)
        rec.pop("error", None)
        manifest.save()
        logger.info(f"[{st.name}] {st.description}")
        t0 = time.perf_counter()
        try:
            metrics = st.run() or {}
        except BaseException as e:
            rec.update(status="failed", error=f"{type(e).__name__}: {e}",
                       traceback=traceback.format_exc(limit=8), seconds=round(time.perf_counter() - t0, 2))
            manifest.save()
            raise
        missing_out = [f"{k}={v}" for k, v in st.outputs.items() if not Path(v).exists()]
        if missing_out:
            rec.update(status="failed", error=f"outputs missing after the stage ran: {missing_out}")
            manifest.save()
            raise RuntimeError(f"stage '{st.name}' finished without writing {missing_out}")
        rec.update(status="done", metrics=metrics, seconds=round(time.perf_counter() - t0, 2),
                   ended=time.strftime("%Y-%m-%dT%H:%M:%S"))
        manifest.save()
        logger.info(f"[{st.name}] done in {rec['seconds']:.1f} s")
    return manifest.data
