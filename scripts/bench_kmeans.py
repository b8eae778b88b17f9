#!/usr/bin/env python
"""Benchmark of U2Seg's dataset-scale K-means: the batched torch implementation against faiss and scikit-learn.

Every backend clusters the same L2-normalised ``N x D`` float32 embeddings (a seeded mixture of Gaussians on the
sphere, saved once as ``.npy``) into ``K`` clusters from the same seeded initial points, for exactly ``--iters``
Lloyd iterations (the data is made so that none converges earlier), each in its own process with the same number
of threads. Reported per backend: seconds, throughput (instances x iterations per second), peak anonymous memory
(the heap, sampled; memory-mapped file pages are not counted since the kernel can drop them), the label agreement
with scikit-learn (same initial centroids and iterations), and the ratios against scikit-learn measured in the same
run. The heap figure is the growth over the process's heap just before clustering (the imports take ~300 MB).

Backends: ``sklearn`` (KMeans, lloyd, reference), ``faiss`` (CPU), ``torch`` (data resident on the device),
``torch-stream`` (data streamed from the memory-mapped file in 16,384-point chunks; what ImageNet-scale runs use).

Example::

    PYTHONPATH=. python scripts/bench_kmeans.py --num-points 50000 --dim 768 --clusters 300 --iters 10 --threads 2
    PYTHONPATH=. python scripts/bench_kmeans.py --device cuda --num-points 1000000 --clusters 800   # GPU machine
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BACKENDS = ("sklearn", "faiss", "torch", "torch-stream")


def make_data(path: Path, n: int, d: int, k: int, seed: int = 0) -> None:
    """``n`` unit vectors around ``2 k`` random centres (overlapping: Lloyd keeps moving for many iterations)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2 * k, d)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        x = centres[rng.integers(0, 2 * k, m)] + rng.normal(scale=1.5, size=(m, d)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()


class PeakAnon:
    """Samples ``RssAnon`` of this process every 20 ms in a thread; ``peak_mb`` is the largest seen."""

    def __init__(self):
        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now_kb() -> int:
        try:
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        except OSError:
            pass
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    def _run(self):
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self.now_kb())
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self.now_kb())

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


def worker(args) -> dict:
    """One backend in this process: load, cluster, report (JSON on stdout)."""
    import torch

    torch.set_num_threads(args.threads)
    from cutler.u2seg.kmeans import initial_centroids, kmeans_faiss, kmeans_sklearn, kmeans_torch

    data = np.load(args.data, mmap_mode="r")
    init = initial_centroids(data, args.clusters, seed=0)
    base_mb = PeakAnon.now_kb() / 1024
    with PeakAnon() as mem:
        t0 = time.perf_counter()
        if args.worker == "sklearn":
            result = kmeans_sklearn(np.array(data), init, args.iters)
        elif args.worker == "faiss":
            import faiss

            faiss.omp_set_num_threads(args.threads)
            result = kmeans_faiss(data, init, args.iters, seed=0)
        elif args.worker == "torch":
            result = kmeans_torch(data, init, args.iters, args.device)
        else:  # torch-stream
            result = kmeans_torch(data, init, args.iters, args.device, max_resident_bytes=0)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    np.save(args.labels_out, result.labels)
    return {"backend": args.worker, "seconds": seconds, "iterations": result.iterations, "inertia": result.inertia,
            "peak_anon_mb": mem.peak_mb, "anon_before_mb": base_mb,
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-points", type=int, default=50000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--clusters", type=int, default=300)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="device of the torch backends (cuda on a GPU machine)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--labels-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return None

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "emb.npy"
        make_data(data, args.num_points, args.dim, args.clusters)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   OPENBLAS_NUM_THREADS=str(args.threads), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        results = {}
        for backend in args.backends:
            labels = Path(tmp) / f"{backend}.npy"
            cmd = [sys.executable, __file__, "--worker", backend, "--data", str(data), "--labels-out", str(labels),
                   "--clusters", str(args.clusters), "--iters", str(args.iters), "--threads", str(args.threads),
                   "--device", args.device if backend.startswith("torch") else "cpu"]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                print(f"{backend} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
            results[backend]["labels"] = np.load(labels)
    n, it = args.num_points, args.iters
    ref = results.get("sklearn")
    print(f"K-means of {n} x {args.dim} float32 into {args.clusters} clusters, {it} iterations, {args.threads} threads, "
          f"torch on {args.device}")
    print(f"{'backend':<14}{'seconds':>9}{'inst*it/s':>12}{'vs sklearn':>11}{'heap +MB':>10}{'vs sklearn':>11}"
          f"{'same labels':>13}")
    table = {}
    for name, r in results.items():
        rate = n * r["iterations"] / r["seconds"]
        row = {"seconds": round(r["seconds"], 3), "instance_iterations_per_s": round(rate), "iterations": r["iterations"],
               "heap_growth_mb": round(r["peak_anon_mb"] - r["anon_before_mb"], 1), "inertia": r["inertia"],
               "gpu_peak_mb": r["gpu_peak_mb"]}
        if ref is not None:
            row["speed_vs_sklearn"] = round(ref["seconds"] / r["seconds"] * r["iterations"] / ref["iterations"], 2)
            row["memory_vs_sklearn"] = round(row["heap_growth_mb"] / max(ref["peak_anon_mb"] - ref["anon_before_mb"], 1e-3), 2)
            row["label_agreement_with_sklearn"] = float((r["labels"] == ref["labels"]).mean())
        table[name] = row
        print(f"{name:<14}{row['seconds']:>9.2f}{rate:>12.0f}{row.get('speed_vs_sklearn', float('nan')):>10.2f}x"
              f"{row['heap_growth_mb']:>10.0f}{row.get('memory_vs_sklearn', float('nan')):>10.2f}x"
              f"{row.get('label_agreement_with_sklearn', float('nan')):>13.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k in (
            "num_points", "dim", "clusters", "iters", "threads", "device")}, "results": table}, indent=1))
    return table


if __name__ == "__main__":
    main()
