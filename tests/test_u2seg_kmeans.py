"""U2Seg's K-means: the torch backend against scikit-learn from the same initial centroids, planted clusters,
faiss, streaming from a memory-mapped file, empty clusters, assignment of new points, saved centroids."""
import numpy as np
import pytest
import torch

from cutler.u2seg.kmeans import (assign_to_centroids, initial_centroids, initial_indices, kmeans_faiss, kmeans_sklearn,
                                 kmeans_torch, load_centroids, run_kmeans, save_clustering)


def _sphere(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _planted(k=6, per=40, d=16, spread=0.05, seed=0):
    """``k`` tight, well-separated clusters of ``per`` points each, shuffled; returns (x, truth)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:k] * 3.0
    truth = np.repeat(np.arange(k), per)
    x = centres[truth] + rng.normal(scale=spread, size=(k * per, d))
    perm = rng.permutation(len(x))
    return x[perm], truth[perm]


def _same_partition(a, b):
    """Labels equal up to renaming the clusters."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_torch_matches_sklearn_from_the_same_initial_centroids():
    x = _sphere(2000, 16, seed=1)  # unit vectors like the embeddings: many clusters, many iterations
    init = initial_centroids(x, 20, seed=3)
    ours = kmeans_torch(x, init, max_iter=300, chunk_size=700)  # several chunks per pass
    ref = kmeans_sklearn(x, init, max_iter=300)
    assert ours.iterations == ref.iterations > 5 and ours.converged and ref.converged
    assert np.array_equal(ours.labels, ref.labels)
    assert abs(ours.inertia - ref.inertia) <= 1e-6 * ref.inertia
    np.testing.assert_allclose(ours.centroids, ref.centroids, atol=1e-6)
    # inertia is what it says: the squared distances to the assigned centroids
    assert ours.inertia == pytest.approx(((x - ours.centroids[ours.labels].astype(np.float64)) ** 2).sum(), rel=1e-6)


def test_iteration_cap_returns_labels_of_the_returned_centroids():
    x = _sphere(1500, 8, seed=4)
    init = initial_centroids(x, 30, seed=0)
    ours, ref = kmeans_torch(x, init, max_iter=3), kmeans_sklearn(x, init, max_iter=3)
    assert not ours.converged and ours.iterations == ref.iterations == 3
    assert np.array_equal(ours.labels, ref.labels)
    brute = ((x[:, None, :] - ours.centroids[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    assert np.array_equal(ours.labels, brute)


def test_planted_clusters_are_recovered_by_torch_and_faiss():
    x, truth = _planted()
    rng = np.random.default_rng(7)
    # One random member of each planted cluster as initial centroid; Lloyd must then find the partition.
    init = np.stack([x[rng.choice(np.flatnonzero(truth == c))] for c in range(6)])
    for result in (kmeans_torch(x, init, max_iter=50), kmeans_faiss(x.astype(np.float32), init, max_iter=20)):
        assert _same_partition(result.labels, truth), result.backend
        for c in range(6):  # the centroids are the members' means
            np.testing.assert_allclose(result.centroids[c], x[result.labels == c].mean(0), atol=1e-5)
    torch_result = kmeans_torch(x, init, max_iter=50)
    assert torch_result.converged and torch_result.iterations <= 3


def test_streaming_from_a_memory_mapped_file_equals_in_memory(tmp_path):
    x = _sphere(2000, 12, seed=5).astype(np.float32)
    np.save(tmp_path / "f.npy", x)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    init = initial_centroids(mm, 10, seed=0)
    assert np.array_equal(init, initial_centroids(x, 10, seed=0))
    streamed = kmeans_torch(mm, init, chunk_size=333, max_resident_bytes=0)  # re-read every pass
    resident = kmeans_torch(torch.from_numpy(x), init)
    assert not streamed.extra["resident"] and resident.extra["resident"]
    assert np.array_equal(streamed.labels, resident.labels) and streamed.iterations == resident.iterations
    np.testing.assert_allclose(streamed.centroids, resident.centroids, atol=1e-6)
    # run_kmeans: every backend starts from the same seeded points; on this data they agree
    a, b = run_kmeans(mm, 10, "torch", seed=0), run_kmeans(mm, 10, "sklearn", seed=0)
    assert np.array_equal(a.labels, b.labels)


def test_seeded_initial_points_are_distinct_data_points():
    idx = initial_indices(1000, 50, seed=0)
    assert len(set(idx.tolist())) == 50 and np.array_equal(idx, initial_indices(1000, 50, seed=0))
    assert not np.array_equal(idx, initial_indices(1000, 50, seed=1))
    assert np.array_equal(idx, torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:50].numpy())
    with pytest.raises(ValueError, match="initial centroids"):
        initial_indices(5, 6, 0)


def test_an_empty_cluster_keeps_its_centroid_instead_of_nan():
    x = _sphere(200, 4, seed=2)
    init = np.concatenate([x[:3], x[:1]])  # a duplicate centroid: the second copy wins no point (ties -> first)
    result = kmeans_torch(x, init, max_iter=1)  # one update: cluster 3 was empty in it
    assert np.isfinite(result.centroids).all()
    assert np.array_equal(result.centroids[3], x[0].astype(np.float32))
    assert not np.allclose(result.centroids[0], x[0])  # its twin moved to its points' mean
    later = kmeans_torch(x, init, max_iter=50)  # and, kept alive, the centroid can win points again
    assert np.isfinite(later.centroids).all() and later.cluster_sizes().min() > 0


def test_assignment_to_saved_centroids(tmp_path):
    x, _ = _planted(k=4, per=30, d=8)
    result = run_kmeans(x.astype(np.float32), 4, "torch", seed=0)
    save_clustering(tmp_path, result, {"seed": 0})
    centroids, meta = load_centroids(tmp_path)
    assert meta["num_clusters"] == 4 and meta["num_points"] == 120 and meta["seed"] == 0
    new = x[:17] + 0.01
    labels, dist = assign_to_centroids(new.astype(np.float32), centroids, chunk_size=5)
    brute = ((new[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert np.array_equal(labels, brute.argmin(1)) and np.array_equal(labels, result.labels[:17])
    np.testing.assert_allclose(dist, brute.min(1), rtol=1e-4, atol=1e-5)
    assert np.array_equal(np.load(tmp_path / "labels.npy"), result.labels)
    with pytest.raises(FileNotFoundError, match="centroids"):
        load_centroids(tmp_path / "nowhere")
