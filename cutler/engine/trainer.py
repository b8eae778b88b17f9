"""The training loop: one process of a (possibly distributed) run.

:func:`train` is the public entry point (``tools/train_net.py`` and the self-training pipeline call it,
through :func:`cutler.engine.launch.launch` for several processes). One iteration:

1. take the next per-rank batch from the worker-built :class:`~cutler.data.build.TrainLoader`
   (decoded, augmented and copy-pasted in the workers);
2. forward under autocast (``solver.amp``), sum the loss dict;
3. all ranks agree whether every loss term is finite; if not, ``solver.nan_policy`` stops (naming the
   iteration and the term; the last good checkpoint stays) or skips the update;
4. backward (through the fp16 grad scaler when used), clip (``solver.clip_gradients``), step, LR step;
5. every ``solver.log_period`` iterations: console, ``metrics.jsonl``, TensorBoard; every
   ``test.eval_period``: Precise BN (``test.precise_bn``); every ``solver.checkpoint_period``: a
   checkpoint; then, at eval periods, ``evaluate``. At the end: Precise BN, ``model_final.pth``, ``evaluate``.

Evaluation and Precise BN run inside a saved-and-restored RNG context, so a run resumed from a checkpoint
replays the interrupted run exactly.
"""
from __future__ import annotations

import os
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from cutler.checkpoint import Checkpointer, capture_rng_state, restore_rng_state
from cutler.config import save_config
from cutler.data.build import build_train_loader
from cutler.modeling.build import amp_dtype_from_cfg, build_model_with_weights
from cutler.solver import (build_gradient_clipper, build_lr_scheduler, build_optimizer, load_lr_scheduler_state,
                           maybe_convert_sync_batchnorm, update_bn_stats)
from cutler.utils.device import resolve_device
from cutler.utils.logging import get_logger, get_rank, get_world_size, setup_logger
from cutler.utils.seed import seed_everything

from .events import IterationTimer, MetricsWriter, format_console_line
from .scaling import auto_scale_workers

logger = get_logger(__name__)

EvaluateFn = Callable[[nn.Module, object], Dict[str, float]]
ModelBuilder = Callable[[object], nn.Module]

PRECISE_BN_SEED_OFFSET = 1_000_003  # a stream of batches disjoint from the training stream


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/Inf under ``solver.nan_policy=stop``; ``iteration`` and ``term`` say where."""

    def __init__(self, iteration: int, term: str, value: float, checkpoint: Optional[Path]):
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"non-finite loss at iteration {iteration}: {term} = {value} (solver.nan_policy=stop; {kept}; "
                         "lower solver.base_lr, enable solver.clip_gradients, or set solver.nan_policy=skip)")
        self.iteration, self.term, self.value, self.checkpoint = iteration, term, value, checkpoint


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def move_to_device(inputs: List[Dict], device: torch.device) -> List[Dict]:
    """Model inputs with every tensor (image, instance fields) on ``device``."""
    if device.type == "cpu":
        return inputs
    out = []
    for d in inputs:
        d = dict(d)
        d["image"] = d["image"].to(device, non_blocking=True)
        if "instances" in d:
            d["instances"] = {k: v.to(device, non_blocking=True) for k, v in d["instances"].items()}
        out.append(d)
    return out


@contextmanager
def preserved_rng(device: torch.device):
    """Run a block without disturbing the Python, NumPy and torch (CPU/CUDA) generators."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _all_gather_objects(obj) -> List:
    if get_world_size() == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast_int(value: int, device: torch.device) -> int:
    if get_world_size() == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


class Trainer:
    """State of one training process; :meth:`train` runs the loop. Built by :func:`train`."""

    def __init__(self, cfg, model_builder: Optional[Callable] = None, evaluate: Optional[EvaluateFn] = None):
        self.cfg = cfg
        self.rank, self.world_size = get_rank(), get_world_size()
        self.output_dir = Path(cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        setup_logger(str(self.output_dir))
        self.device = self._device()
        self.evaluate = evaluate
        s = cfg.solver
        self.max_iter = int(s.max_iter)
        self.nan_policy = str(s.nan_policy)
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"solver.nan_policy must be 'stop' or 'skip', got '{self.nan_policy}'")

        seed = int(cfg.seed)
        if seed < 0:
            seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
        self.seed = _broadcast_int(seed, self.device)
        # Different global streams per rank (model-side sampling), one shared data seed (self.seed).
        seed_everything(self.seed + self.rank)
        if self.rank == 0:
            logger.info("seed %d, %d process(es), device %s", self.seed, self.world_size, self.device)
            save_config(cfg, self.output_dir / "config.yaml")

        # Initial weights: shape mismatches (a predictor with another num_classes, e.g. COCO fine-tuning from a
        # 1-class CutLER model) keep their fresh initialisation, as Detectron2's checkpointer does.
        builder = model_builder or (lambda c: build_model_with_weights(c, c.model.weights, "skip_mismatched",
                                                                       device=self.device))
        model = builder(cfg).to(self.device)
        model = maybe_convert_sync_batchnorm(model, cfg, self.world_size, self.device)
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = build_lr_scheduler(cfg, self.optimizer)
        self.clipper = build_gradient_clipper(cfg)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        if self.world_size > 1:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(s.ddp_find_unused_parameters))
        self.model = model
        self.checkpointer = Checkpointer(self.output_dir, int(s.checkpoint_keep_last))
        self.start_iter = 0
        self.last_good_checkpoint: Optional[Path] = None
        self._sampler_state: Optional[Dict] = None
        self._rng_state: Optional[Dict] = None
        self.writer: Optional[MetricsWriter] = None  # opened by train(), once the start iteration is known

    # ------------------------------------------------------------------------------------------ setup
    def _device(self) -> torch.device:
        device = resolve_device(str(self.cfg.model.device))
        if device.type == "cuda" and self.world_size > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank % torch.cuda.device_count())))
            torch.cuda.set_device(device)
        return device

    def _amp_dtype(self) -> Optional[torch.dtype]:
        dtype = amp_dtype_from_cfg(self.cfg)
        if dtype is None:
            return None
        if self.device.type != "cuda" and dtype == torch.float16:
            logger.warning("solver.amp with float16 needs CUDA; training in float32 on %s (bfloat16 works on CPU)",
                           self.device.type)
            return None
        return dtype

    # ------------------------------------------------------------------------------------- checkpoints
    def state_dict(self, iteration: int, sampler_state: Dict) -> Dict:
        """Everything :meth:`resume` needs; collective (all ranks must call it)."""
        samplers = _all_gather_objects(sampler_state)
        rngs = _all_gather_objects(capture_rng_state())
        return {
            "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "iteration": iteration, "seed": self.seed, "world_size": self.world_size,
            "sampler": samplers, "rng": rngs, "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }

    def save(self, name: str, iteration: int, sampler_state: Dict) -> Optional[Path]:
        state = self.state_dict(iteration, sampler_state)
        path = self.checkpointer.save(name, state) if self.rank == 0 else None
        if self.world_size > 1:
            dist.barrier()
        self.last_good_checkpoint = self.checkpointer.save_dir / name
        return path

    def resume(self, path: Optional[Path] = None) -> bool:
        """Load ``path`` (default: the output folder's last checkpoint). Returns False when there is none."""
        path = path or self.checkpointer.last_checkpoint()
        if path is None:
            logger.info("no checkpoint in %s: starting from iteration 0", self.output_dir)
            return False
        ckpt = Checkpointer.load(path)
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        load_lr_scheduler_state(self.scheduler, ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_iter = int(ckpt["iteration"])
        self.seed = int(ckpt["seed"])
        self.last_good_checkpoint = Path(path)
        if int(ckpt["world_size"]) == self.world_size:
            self._sampler_state = ckpt["sampler"][self.rank]
            self._rng_state = ckpt["rng"][self.rank]
        else:
            logger.warning("checkpoint written by %d processes, resuming with %d: the data order and RNG restart "
                           "(training continues, not bit-exactly)", ckpt["world_size"], self.world_size)
            seed_everything(self.seed + self.rank + self.start_iter)
            self.seed = self.seed + self.start_iter
        logger.info("resumed from %s at iteration %d", path, self.start_iter)
        return True

    # --------------------------------------------------------------------------------------- the loop
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _check_finite(self, loss_dict: Dict[str, torch.Tensor]) -> Optional[tuple]:
        """``(term, value)`` of the first non-finite loss on any rank (all ranks get the same answer)."""
        values = torch.stack([v.detach().float() for v in loss_dict.values()])
        flag = (~torch.isfinite(values)).to(torch.int64)
        if self.world_size > 1:
            dist.all_reduce(flag)
        if not flag.any():
            return None
        idx = int(torch.nonzero(flag)[0])
        return list(loss_dict)[idx], float(values[idx])

    def _reduce_for_logging(self, loss_dict: Dict[str, torch.Tensor]) -> Dict[str, float]:
        values = torch.stack([v.detach().float() for v in loss_dict.values()])
        if self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        return dict(zip(loss_dict, values.tolist()))

    def run_step(self, inputs: List[Dict], iteration: int) -> Optional[Dict[str, torch.Tensor]]:
        """One optimisation step; returns the loss dict, or None when the step was skipped (NaN policy)."""
        with self._autocast():
            loss_dict = self.model(inputs)
        bad = self._check_finite(loss_dict)
        if bad is not None:
            term, value = bad
            if self.nan_policy == "stop":
                raise NonFiniteLossError(iteration, term, value, self.last_good_checkpoint)
            logger.warning("iteration %d: %s = %s, skipping this update (solver.nan_policy=skip)", iteration, term, value)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.scale(losses).backward()
            if self.clipper is not None:
                self.scaler.unscale_(self.optimizer)
                self.clipper(params)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            losses.backward()
            if self.clipper is not None:
                self.clipper(params)
            self.optimizer.step()
        return loss_dict

    def run_evaluation(self, iteration: int) -> Dict[str, float]:
        """``evaluate(model, cfg)`` on rank 0 in eval mode; logged to metrics and returned."""
        results: Dict[str, float] = {}
        if self.evaluate is not None and self.rank == 0:
            model = unwrap(self.model)
            model.eval()
            try:
                with preserved_rng(self.device), torch.no_grad():
                    results = {k: float(v) for k, v in (self.evaluate(model, self.cfg) or {}).items()}
            finally:
                model.train()
            logger.info("evaluation at iteration %d: %s", iteration, results)
            if self.writer is not None and results:
                self.writer.write(iteration, results)
        if self.world_size > 1:
            dist.barrier()
        return results

    def precise_bn(self) -> int:
        """Recompute BatchNorm statistics over ``test.precise_bn.num_iter`` fresh training batches (a data
        stream of its own, global RNGs untouched: the training trajectory does not change).

        The batches are not copy-pasted: Detectron2's PreciseBN hook reads its own training loader and
        CutLER pastes only inside the training step, so the published statistics come from plain images."""
        n = int(self.cfg.test.precise_bn.num_iter)
        loader = build_train_loader(self.cfg, self.seed + PRECISE_BN_SEED_OFFSET, copy_paste=False)
        data = (move_to_device(b["inputs"], self.device) for b in loader)
        with preserved_rng(self.device), self._autocast():
            used = update_bn_stats(unwrap(self.model), data, n)
        logger.info("precise BN: statistics recomputed over %d batches", used)
        return used

    def train(self) -> Path:
        """Run iterations ``start_iter .. max_iter - 1``; returns the final checkpoint's path."""
        cfg, s = self.cfg, self.cfg.solver
        loader = build_train_loader(cfg, self.seed, state=self._sampler_state)
        sampler_state = loader.state_dict()
        data: Iterator = iter(loader)
        if self._rng_state is not None:
            # Last, after everything that could draw from the global generators during setup.
            restore_rng_state(self._rng_state)
        log_period, ckpt_period, eval_period = int(s.log_period), int(s.checkpoint_period), int(cfg.test.eval_period)
        precise_bn = bool(cfg.test.precise_bn.enabled)
        if self.rank == 0:
            self.writer = MetricsWriter(self.output_dir, start_iter=self.start_iter)
        timer, data_time = IterationTimer(), 0.0
        skipped_images = 0
        self.model.train()
        logger.info("training iterations %d..%d", self.start_iter, self.max_iter)
        timer.reset()
        for iteration in range(self.start_iter, self.max_iter):
            t0 = time.perf_counter()
            batch = next(data)
            data_time = time.perf_counter() - t0
            sampler_state = batch["state"]
            skipped_images += len(batch["skipped"])
            loss_dict = self.run_step(move_to_device(batch["inputs"], self.device), iteration)
            self.scheduler.step()
            timer.tick()
            done = iteration + 1
            if loss_dict is not None and (done % log_period == 0 or done == self.max_iter or iteration == self.start_iter):
                losses = self._reduce_for_logging(loss_dict)
                lr = self.optimizer.param_groups[0]["lr"]
                if self.rank == 0:
                    logger.info(format_console_line(done, self.max_iter, losses, lr, timer.seconds_per_iter, data_time))
                    scalars = {"total_loss": sum(losses.values()), **losses, "lr": lr, "data_time": data_time}
                    if timer.seconds_per_iter:
                        scalars["it_per_s"] = 1.0 / timer.seconds_per_iter
                    if skipped_images:
                        scalars["skipped_images"] = skipped_images
                    self.writer.write(done, scalars)
            elif loss_dict is None and self.rank == 0:
                self.writer.write(done, {"skipped_step": 1})
            # Precise BN before the checkpoint of the same iteration (as Detectron2's hook order), so that
            # a run resumed from it holds the same BN statistics as the uninterrupted run.
            evaluating = eval_period > 0 and done % eval_period == 0 and done < self.max_iter
            if evaluating and precise_bn:
                self.precise_bn()
            if ckpt_period > 0 and done % ckpt_period == 0 and done < self.max_iter:
                self.save(Checkpointer.periodic_name(done), done, sampler_state)
            if evaluating:
                self.run_evaluation(done)
            if evaluating or (ckpt_period > 0 and done % ckpt_period == 0):
                timer.reset()
        final = self.output_dir / "model_final.pth"
        if self.start_iter < self.max_iter or not final.is_file():
            if precise_bn:
                self.precise_bn()
            self.save("model_final.pth", self.max_iter, sampler_state)
        if eval_period > 0 or self.evaluate is not None:
            self.run_evaluation(self.max_iter)
        if self.writer is not None:
            self.writer.close()
        del data, loader
        return final


def train(cfg, resume: bool = False, evaluate: Optional[EvaluateFn] = None,
          model_builder: Optional[ModelBuilder] = None) -> Path:
    """Train the detector of ``cfg`` in this process (call through :func:`cutler.engine.launch.launch`
    for several processes); returns the path of ``model_final.pth`` in ``cfg.output_dir``.

    Args:
        cfg: the full config (:func:`cutler.config.load_config`).
        resume: continue from the last checkpoint in ``cfg.output_dir`` if there is one (exactly where it
            stopped: model, optimizer, scheduler, scaler, RNG and data position); otherwise start afresh.
        evaluate: ``evaluate(model, cfg) -> {metric: value}``, run on rank 0 every ``test.eval_period``
            iterations and at the end (None: no evaluation).
        model_builder: ``model_builder(cfg) -> nn.Module`` (default: the detector of ``cfg`` with
            ``cfg.model.weights`` loaded, :func:`cutler.modeling.build.build_model_with_weights`).

    Raises:
        NonFiniteLossError: a NaN/Inf loss under ``solver.nan_policy=stop``.
    """
    cfg = auto_scale_workers(cfg, get_world_size())
    trainer = Trainer(cfg, model_builder, evaluate)
    if resume:
        trainer.resume()
    return trainer.train()
