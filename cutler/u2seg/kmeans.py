"""K-means over every instance of a dataset (U2Seg's pseudo-classes), three interchangeable backends.

The algorithm is Lloyd's (EM) K-means for the Euclidean metric, minimising the within-cluster sum of
squares, from ``K`` distinct data points drawn with a fixed seed as initial centroids (the published
initialisation: the first ``K`` of a seeded random permutation). On L2-normalised embeddings the nearest
centroid in Euclidean distance is also the one of largest cosine similarity.

Backends:

* ``torch`` (:func:`kmeans_torch`): full-batch Lloyd on any device, streaming the ``(N, D)`` data (a
  NumPy array, a memory-mapped ``.npy`` or a tensor) through the device in chunks, so only one chunk, the
  centroids and ``(K, D)`` float64 sums are resident. Each iteration is one pass: assign every point to its
  nearest centroid and accumulate the new centroids. It stops when no assignment changes (then more
  iterations would change nothing) or after ``max_iter``; the returned labels are always those of the
  returned centroids. A cluster that loses all its points keeps its previous centroid (the published
  code divides by zero and produces NaN centroids there).
* ``faiss`` (:func:`kmeans_faiss`): faiss' CPU K-means from the same initial centroids, optionally on a
  seeded sample of ``max_points_per_centroid * K`` points, then every point assigned in chunks; for CPU
  machines and very large N. faiss runs all ``max_iter`` iterations and re-seeds empty clusters by
  splitting large ones.
* ``sklearn`` (:func:`kmeans_sklearn`): scikit-learn's ``KMeans(algorithm="lloyd", n_init=1, tol=0)``
  from the same initial centroids; small runs and the reference the tests compare the torch backend to.

:func:`assign_to_centroids` puts new instances (a later round's predictions) in the nearest existing
cluster; :func:`save_clustering` / :func:`load_centroids` keep the centroids beside the labels.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch

from cutler.utils.io import atomic_open, atomic_write_json
from cutler.utils.logging import get_logger

logger = get_logger(__name__)

Array = Union[np.ndarray, torch.Tensor]
BACKENDS = ("torch", "faiss", "sklearn")
DEFAULT_CHUNK = 16384  # points per device transfer / distance block (chunk x K floats of distances)


@dataclass
class KMeansResult:
    """What a K-means run produced.

    centroids: ``(K, D)`` float32; labels: ``(N,)`` int64 cluster index in ``[0, K)`` of each point (the
    nearest returned centroid); inertia: sum of squared distances of the points to their centroids;
    iterations: Lloyd iterations run; converged: no assignment changed in the last one.
    """

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    iterations: int
    converged: bool
    backend: str
    seconds: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)

    def cluster_sizes(self) -> np.ndarray:
        """``(K,)`` int64 number of points per cluster."""
        return np.bincount(self.labels, minlength=len(self.centroids))


def initial_indices(num_points: int, k: int, seed: int) -> np.ndarray:
    """``(k,)`` int64 indices of the initial centroids: the first ``k`` of a seeded random permutation."""
    if not 0 < k <= num_points:
        raise ValueError(f"cannot draw {k} initial centroids from {num_points} points (need 0 < K <= N)")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(int(num_points), generator=g)[:k].numpy()


def initial_centroids(data: Array, k: int, seed: int) -> np.ndarray:
    """``(k, D)`` float64 copies of the data points :func:`initial_indices` selects, in its order."""
    idx = initial_indices(len(data), k, seed)
    order = np.argsort(idx)
    # Read in increasing row order (a memory-mapped file is then read front to back), then put back in order.
    rows = data[torch.from_numpy(idx[order])] if torch.is_tensor(data) else data[idx[order]]
    rows = rows.cpu().numpy() if torch.is_tensor(rows) else np.asarray(rows)
    out = np.empty(rows.shape, dtype=np.float64)
    out[order] = rows
    return out


def _compute_dtype(data: Array) -> torch.dtype:
    dt = data.dtype if torch.is_tensor(data) else torch.from_numpy(np.zeros(0, dtype=data.dtype)).dtype
    return torch.float64 if dt == torch.float64 else torch.float32


class _Chunks:
    """The rows of ``data`` as device tensors, ``chunk_size`` at a time.

    Data that fits in ``max_resident_bytes`` goes to the device once and stays; larger data (a memory-mapped
    file of millions of embeddings) is read and copied chunk by chunk on every pass.
    """

    def __init__(self, data: Array, device: torch.device, chunk_size: int, max_resident_bytes: int):
        if data.ndim != 2:
            raise ValueError(f"K-means data must be (N, D), got shape {tuple(data.shape)}")
        self.data, self.device = data, device
        self.dtype = _compute_dtype(data)
        self.chunk_size = max(1, int(chunk_size))
        self.n = int(data.shape[0])
        nbytes = self.n * int(data.shape[1]) * (8 if self.dtype == torch.float64 else 4)
        self.resident = self._to_device(data) if nbytes <= max_resident_bytes else None

    def _to_device(self, rows: Array) -> torch.Tensor:
        if torch.is_tensor(rows):
            return rows.to(device=self.device, dtype=self.dtype, non_blocking=True)
        dtype = np.float64 if self.dtype == torch.float64 else np.float32
        if not (isinstance(rows, np.ndarray) and rows.dtype == dtype and rows.flags.writeable and rows.flags.c_contiguous):
            rows = np.array(rows, dtype=dtype)  # memory-mapped rows are read-only, and torch wants writable arrays
        return torch.from_numpy(rows).to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[Tuple[int, torch.Tensor]]:
        for start in range(0, self.n, self.chunk_size):
            stop = min(start + self.chunk_size, self.n)
            yield start, (self.resident[start:stop] if self.resident is not None else self._to_device(self.data[start:stop]))


def _nearest(x: torch.Tensor, centroids: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """``(n,)`` index of the nearest centroid: ``argmin_k ||c_k||^2 - 2 x . c_k`` (``||x||^2`` is common to
    all k; ties go to the lowest index)."""
    return torch.addmm(c_sq[None, :], x, centroids.T, beta=1.0, alpha=-2.0).argmin(dim=1)


def _inertia(chunks: _Chunks, centroids: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum over points of ``||x - c_label||^2``, from the differences themselves, accumulated in float64."""
    total = torch.zeros((), dtype=torch.float64, device=centroids.device)
    for start, x in chunks:
        diff = x - centroids[labels[start:start + x.shape[0]]]
        total += (diff * diff).sum(dim=1, dtype=torch.float64).sum()
    return float(total)


def default_resident_bytes(device: torch.device) -> int:
    """How much data :func:`kmeans_torch` keeps on ``device``: half the free memory of a GPU, 2 GiB elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return 2 << 30


def kmeans_torch(data: Array, init: np.ndarray, max_iter: int = 100, device: Union[str, torch.device] = "cpu",
                 chunk_size: int = DEFAULT_CHUNK, max_resident_bytes: Optional[int] = None, progress: bool = False
                 ) -> KMeansResult:
    """Lloyd's K-means in torch, batched on ``device`` (see the module docstring).

    Args:
        data: ``(N, D)`` float32/float64 points (NumPy array, ``np.memmap`` or tensor); float64 data is
            computed in float64, everything else in float32.
        init: ``(K, D)`` initial centroids (e.g. :func:`initial_centroids`).
        max_iter: at most this many iterations.
        device: where distances and sums are computed.
        chunk_size: points per distance block (memory: ``chunk_size x K`` distances).
        max_resident_bytes: data up to this size is kept on the device between iterations (default
            :func:`default_resident_bytes`).
        progress: a tqdm bar over iterations.

    Returns:
        :class:`KMeansResult` (labels on the host as int64).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    device = torch.device(device)
    if max_resident_bytes is None:
        max_resident_bytes = default_resident_bytes(device)
    chunks = _Chunks(data, device, chunk_size, max_resident_bytes)
    centroids = torch.as_tensor(np.asarray(init), dtype=chunks.dtype).to(device).clone()
    k, d = centroids.shape
    if d != data.shape[1]:
        raise ValueError(f"initial centroids have {d} dimensions, the data {data.shape[1]}")
    labels = torch.full((chunks.n,), -1, dtype=torch.int64, device=device)
    new_labels = torch.empty_like(labels)
    converged, iterations = False, 0
    for iterations in tqdm(range(1, max_iter + 1), desc="k-means", disable=not progress, leave=False):
        sums = torch.zeros((k, d), dtype=torch.float64, device=device)
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        c_sq = (centroids * centroids).sum(dim=1)
        for start, x in chunks:
            lab = _nearest(x, centroids, c_sq)
            new_labels[start:start + x.shape[0]] = lab
            # per-chunk sums in the data's precision, added up in float64 across chunks
            sums += torch.zeros((k, d), dtype=x.dtype, device=device).index_add_(0, lab, x).double()
            counts += torch.bincount(lab, minlength=k).double()
        if torch.equal(new_labels, labels):
            converged = True  # the same labels give the same means: the centroids are already these
            break
        labels, new_labels = new_labels, labels
        filled = counts > 0
        centroids = torch.where(filled[:, None], sums / counts.clamp(min=1)[:, None], centroids.double()).to(chunks.dtype)
    if not converged:
        c_sq = (centroids * centroids).sum(dim=1)
        for start, x in chunks:
            labels[start:start + x.shape[0]] = _nearest(x, centroids, c_sq)
    inertia = _inertia(chunks, centroids, labels)
    return KMeansResult(centroids.float().cpu().numpy(), labels.cpu().numpy(), inertia, iterations, converged,
                        "torch", time.perf_counter() - t0, {"device": str(device), "resident": chunks.resident is not None})


def assign_to_centroids(data: Array, centroids: Array, device: Union[str, torch.device] = "cpu",
                        chunk_size: int = DEFAULT_CHUNK) -> Tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every point.

    Args:
        data: ``(N, D)`` points (array, memmap or tensor); centroids: ``(K, D)``.
    Returns:
        ``(labels (N,) int64 in [0, K), squared distances (N,) float32)``.
    """
    device = torch.device(device)
    chunks = _Chunks(data, device, chunk_size, max_resident_bytes=0)
    c = torch.as_tensor(np.asarray(centroids), dtype=chunks.dtype).to(device)
    c_sq = (c * c).sum(dim=1)
    labels = np.empty(chunks.n, dtype=np.int64)
    dist = np.empty(chunks.n, dtype=np.float32)
    for start, x in chunks:
        d2 = torch.addmm(c_sq[None, :], x, c.T, beta=1.0, alpha=-2.0)
        best, lab = d2.min(dim=1)
        labels[start:start + x.shape[0]] = lab.cpu().numpy()
        dist[start:start + x.shape[0]] = (best + (x * x).sum(dim=1)).clamp(min=0).float().cpu().numpy()
    return labels, dist


def kmeans_faiss(data: Array, init: np.ndarray, max_iter: int = 100, seed: int = 0,
                 max_points_per_centroid: int = 0, chunk_size: int = DEFAULT_CHUNK) -> KMeansResult:
    """faiss K-means (CPU) from ``init``, then every point assigned to the nearest centroid.

    Args:
        max_points_per_centroid: train on a seeded random sample of this many points per centroid (only
            the sample is loaded in memory); 0 = on all points.
    """
    import faiss

    t0 = time.perf_counter()
    init = np.ascontiguousarray(np.asarray(init, dtype=np.float32))
    k, d = init.shape
    n = len(data)
    if max_points_per_centroid > 0 and n > max_points_per_centroid * k:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=max_points_per_centroid * k, replace=False))
        train = data[torch.from_numpy(sample)] if torch.is_tensor(data) else data[sample]
    else:
        train = data
    train = np.ascontiguousarray(train.cpu().numpy() if torch.is_tensor(train) else np.asarray(train), dtype=np.float32)
    km = faiss.Kmeans(d, k, niter=int(max_iter), seed=int(seed), verbose=False, spherical=False,
                      max_points_per_centroid=max(len(train) // k + 1, 1), min_points_per_centroid=1)
    km.train(train, init_centroids=init)
    del train
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    index = faiss.IndexFlatL2(d)
    index.add(centroids)
    labels = np.empty(n, dtype=np.int64)
    inertia = 0.0
    for start in range(0, n, chunk_size):
        block = data[start:start + chunk_size]
        block = np.ascontiguousarray(block.cpu().numpy() if torch.is_tensor(block) else block, dtype=np.float32)
        dist, lab = index.search(block, 1)
        labels[start:start + len(block)] = lab[:, 0]
        inertia += float(np.maximum(dist[:, 0], 0).astype(np.float64).sum())
    return KMeansResult(centroids, labels, inertia, int(max_iter), False, "faiss", time.perf_counter() - t0,
                        {"trained_on": int(min(n, max_points_per_centroid * k) if max_points_per_centroid > 0 else n)})


def kmeans_sklearn(data: Array, init: np.ndarray, max_iter: int = 100) -> KMeansResult:
    """scikit-learn's Lloyd K-means from ``init`` (one run, strict convergence); the data is loaded in memory."""
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    x = data.cpu().numpy() if torch.is_tensor(data) else np.asarray(data)
    init = np.asarray(init, dtype=x.dtype)
    km = KMeans(n_clusters=len(init), init=init, n_init=1, max_iter=int(max_iter), tol=0.0, algorithm="lloyd")
    km.fit(x)
    converged = int(km.n_iter_) < max_iter
    return KMeansResult(km.cluster_centers_.astype(np.float32), km.labels_.astype(np.int64), float(km.inertia_),
                        int(km.n_iter_), converged, "sklearn", time.perf_counter() - t0)


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` = torch on CUDA, else faiss when it imports, else torch on the CPU."""
    name = (name or "auto").lower()
    if name == "auto":
        if device.type == "cuda":
            return "torch"
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "torch"
        return "faiss"
    if name not in BACKENDS:
        raise ValueError(f"unknown K-means backend '{name}', expected one of {BACKENDS} or auto")
    return name


def run_kmeans(data: Array, k: int, backend: str = "auto", seed: int = 0, max_iter: int = 100,
               device: Union[str, torch.device] = "cpu", max_points_per_centroid: int = 0,
               chunk_size: int = DEFAULT_CHUNK, progress: bool = False) -> KMeansResult:
    """K-means of ``data`` into ``k`` clusters with the named backend, all from the same seeded initial points."""
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    init = initial_centroids(data, k, seed)
    logger.info("k-means: %d points x %d dims into %d clusters (%s, seed %d, <= %d iterations)", len(data),
                data.shape[1], k, backend, seed, max_iter)
    if backend == "torch":
        result = kmeans_torch(data, init, max_iter, device, chunk_size, progress=progress)
    elif backend == "faiss":
        result = kmeans_faiss(data, init, max_iter, seed, max_points_per_centroid, chunk_size)
    else:
        result = kmeans_sklearn(data, init, max_iter)
    empty = int((result.cluster_sizes() == 0).sum())
    logger.info("k-means (%s): %d iterations%s, inertia %.6g, %d empty clusters, %.1f s", result.backend,
                result.iterations, " (converged)" if result.converged else "", result.inertia, empty, result.seconds)
    return result


CENTROIDS_FILE = "centroids.npy"
LABELS_FILE = "labels.npy"
CLUSTERING_FILE = "clustering.json"


def save_clustering(out_dir: os.PathLike | str, result: KMeansResult, meta: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``centroids.npy`` (K, D) float32, ``labels.npy`` (N,) int32 and ``clustering.json`` (settings,
    inertia, iterations, cluster sizes) atomically under ``out_dir``; returns the JSON path."""
    out_dir = Path(out_dir)
    for name, arr in ((CENTROIDS_FILE, result.centroids.astype(np.float32)), (LABELS_FILE, result.labels.astype(np.int32))):
        with atomic_open(out_dir / name, "wb") as f:
            np.save(f, arr)
    sizes = result.cluster_sizes()
    info = {"num_clusters": int(len(result.centroids)), "num_points": int(len(result.labels)),
            "dim": int(result.centroids.shape[1]), "backend": result.backend, "iterations": result.iterations,
            "converged": result.converged, "inertia": result.inertia, "seconds": round(result.seconds, 3),
            "empty_clusters": int((sizes == 0).sum()), "largest_cluster": int(sizes.max()),
            "median_cluster": float(np.median(sizes)), **result.extra, **(meta or {})}
    atomic_write_json(out_dir / CLUSTERING_FILE, info, indent=1)
    return out_dir / CLUSTERING_FILE


def load_centroids(path: os.PathLike | str) -> Tuple[np.ndarray, Dict[str, Any]]:
    """``(centroids (K, D) float32, clustering.json contents)`` from a clustering folder or a ``centroids.npy``.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    npy = folder / CENTROIDS_FILE if path.is_dir() else path
    if not npy.is_file():
        raise FileNotFoundError(f"centroids not found: {npy} (run the clustering first)")
    meta_file = folder / CLUSTERING_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return np.load(npy).astype(np.float32), meta
