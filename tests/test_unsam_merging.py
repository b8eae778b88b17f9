"""UnSAM's batched iterative merging against the plain sequential one-pair-at-a-time reference.

The batched implementation must give exactly the same partition at every level, for every crop of a batch,
on random features and on adversarial ones (ties everywhere, single patches, equal and zero features).
"""
import numpy as np
import pytest
import torch

from cutler.unsam.hierarchy import cluster_tree
from cutler.unsam.merging import (
    exact_feature_scale,
    grid_edges,
    iterative_merge,
    quantize_features,
)
from unsam_reference import iterative_merge_reference

THETAS = (0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def assert_same_as_reference(q: torch.Tensor, grid, thresholds=THETAS):
    """Batched merging of every crop of ``q`` equals the sequential reference, level by level."""
    hier = iterative_merge(q, grid, thresholds, quantized=True)
    for i in range(q.shape[0]):
        ref = iterative_merge_reference(q[i].numpy(), grid, thresholds)
        np.testing.assert_array_equal(hier.labels[i].numpy(), ref, err_msg=f"crop {i} of grid {grid}")
    return hier


def smooth_features(b, grid, c, seed, noise=0.6, blobs=3):
    """Features with spatial structure (low-resolution random field + noise), as real keys have."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    base = torch.randn(b, c, blobs, blobs, generator=g)
    field = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    f = field + noise * torch.randn(b, c, h, w, generator=g) + 0.5 * torch.randn(b, c, 1, 1, generator=g)
    return f.flatten(2).transpose(1, 2).contiguous()


@pytest.mark.parametrize("grid,c,seed", [((6, 7), 8, 0), ((8, 8), 16, 1), ((1, 9), 4, 2), ((9, 1), 4, 3),
                                         ((16, 16), 24, 4), ((5, 3), 3, 5)])
def test_batched_merging_equals_sequential_reference_on_random_features(grid, c, seed):
    feats = smooth_features(5, grid, c, seed)
    q = quantize_features(feats)
    hier = assert_same_as_reference(q, grid)
    # the features go through the same quantization when the caller passes floats
    assert torch.equal(iterative_merge(feats, grid, THETAS).labels, hier.labels)
    # levels nest: a cluster of a finer level lies inside one cluster of every coarser level
    for i in range(q.shape[0]):
        lab = hier.labels[i]
        for t in range(1, len(THETAS)):
            pairs = torch.unique(torch.stack([lab[t - 1], lab[t]]), dim=1)
            assert torch.unique(pairs[0]).numel() == pairs.shape[1]


def test_ties_everywhere_small_alphabet_and_checkerboards():
    g = torch.Generator().manual_seed(7)
    # 3-dimensional features from {-1, 0, 1}: many patches are equal or opposite, similarities repeat
    small = torch.randint(-1, 2, (24, 36, 3), generator=g).double()
    assert_same_as_reference(small, (6, 6), (0.9, 0.5, 0.0, -0.5))
    # a checkerboard of two vectors at 60 degrees and a striped pattern: every candidate pair ties
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.7320508])
    yy, xx = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    board = torch.where(((yy + xx) % 2 == 0).reshape(-1, 1), a, b)
    stripes = torch.where((yy % 2 == 0).reshape(-1, 1), a, b)
    q = quantize_features(torch.stack([board, stripes]))
    assert_same_as_reference(q, (6, 6), (0.9, 0.5, 0.4, 0.1))


@pytest.mark.parametrize("seed", range(4))
def test_random_grids_alphabets_and_thresholds(seed):
    """Fuzz: random grid shapes, integer features from small alphabets (frequent exact ties) and random
    decreasing thresholds, including negative ones."""
    rng = np.random.default_rng(seed)
    for _ in range(6):
        grid = (int(rng.integers(1, 7)), int(rng.integers(1, 7)))
        c = int(rng.integers(1, 5))
        alphabet = int(rng.integers(1, 4))
        q = torch.from_numpy(rng.integers(-alphabet, alphabet + 1, (3, grid[0] * grid[1], c))).double()
        thresholds = tuple(sorted(rng.uniform(-1, 1, int(rng.integers(1, 5))).round(3).tolist(), reverse=True))
        if len(set(thresholds)) == len(thresholds):
            assert_same_as_reference(q, grid, thresholds)


def test_all_equal_all_zero_and_single_patch_crops():
    # all-equal features: every similarity is 1, the order is decided by the tie-break alone
    equal = torch.full((2, 20, 5), 3.0, dtype=torch.float64)
    hier = assert_same_as_reference(equal, (4, 5))
    assert (hier.labels[:, 0] == 0).all()  # one cluster after the first level
    # all-zero features: similarity 0 everywhere, merged only by a threshold <= 0
    zero = quantize_features(torch.zeros(2, 12, 4))
    assert torch.count_nonzero(zero) == 0
    hier = assert_same_as_reference(zero, (3, 4), (0.5, 0.0))
    assert torch.equal(hier.labels[:, 0], torch.arange(12).expand(2, -1)) and (hier.labels[:, 1] == 0).all()
    # single-patch crops: no edges, every level is the patch itself
    hier = assert_same_as_reference(quantize_features(torch.randn(3, 1, 6)), (1, 1))
    assert hier.labels.shape == (3, len(THETAS), 1) and (hier.labels == 0).all() and (hier.merges == 0).all()


def test_crops_of_one_batch_do_not_interact():
    """A batch mixing crops that finish at once with crops that merge for long gives each crop its own result."""
    grid = (7, 7)
    busy = quantize_features(smooth_features(3, grid, 6, 11))
    done_at_once = torch.full((1, 49, 6), 5.0, dtype=torch.float64)  # merges to one cluster, then idles
    signs = torch.randn(1, 49, 6, generator=torch.Generator().manual_seed(3)).sign().double()  # ties galore
    batch = torch.cat([busy[:1], done_at_once, busy[1:], signs])
    hier = assert_same_as_reference(batch, grid)
    alone = iterative_merge(busy, grid, THETAS, quantized=True)
    assert torch.equal(hier.labels[[0, 2, 3]], alone.labels)


def test_merged_cluster_more_similar_than_its_parts_is_followed():
    """Inversion: the mean of two patches can be closer to a neighbour than either patch. Patch 0 is less
    similar to patch 1 (0.824) than 1 to 2 (0.835), but once 1 and 2 merge their mean is at 0.86 to patch 0,
    above the threshold 0.83: the sequential algorithm then merges 0 in the same level, and so must we."""
    x = torch.tensor([[1.0, 0.0, 0.593], [1.0, 0.3, 0.0], [1.0, -0.3, 0.0]])
    hier = assert_same_as_reference(quantize_features(x[None]), (1, 3), (0.83, 0.5))
    assert hier.labels[0].tolist() == [[0, 0, 0], [0, 0, 0]]


def test_quantization_bound_and_scale():
    n, c = 1024, 768
    q = exact_feature_scale(n, c)
    assert n * n * c * q * q <= 2 ** 53 < n * n * c * (q + 1) ** 2
    feats = torch.randn(2, 16, 8)
    qf = quantize_features(feats)
    assert qf.dtype == torch.float64 and torch.equal(qf, qf.round())
    assert qf.abs().amax(dim=(1, 2)).tolist() == [exact_feature_scale(16, 8)] * 2
    with pytest.raises(ValueError, match="too many"):
        exact_feature_scale(2 ** 20, 2 ** 20)


def test_threshold_and_shape_errors():
    with pytest.raises(ValueError, match="strictly decreasing"):
        iterative_merge(torch.randn(1, 4, 2), (2, 2), (0.1, 0.5))
    with pytest.raises(ValueError, match="grid 3x3"):
        iterative_merge(torch.randn(1, 4, 2), (3, 3), THETAS)


def test_grid_edges_are_the_four_neighbourhood():
    u, v = grid_edges((2, 3))
    assert sorted(zip(u.tolist(), v.tolist())) == [(0, 1), (0, 3), (1, 2), (1, 4), (2, 5), (3, 4), (4, 5)]


def test_cluster_tree_levels_parents_and_min_size():
    # 1x6 grid, levels finest first: {0,1} {2,3} {4} {5} -> {0,1,2,3} {4,5} -> one cluster
    labels = np.array([[0, 0, 2, 2, 4, 5], [0, 0, 0, 0, 4, 4], [0, 0, 0, 0, 0, 0]])
    nodes = cluster_tree(labels, (1, 6), min_patches=2)
    got = [(n.patches[0].nonzero()[0].tolist(), n.level, n.finest_level, n.parent) for n in nodes]
    assert got == [([0, 1, 2, 3, 4, 5], 1, 1, -1), ([0, 1, 2, 3], 2, 2, 0), ([4, 5], 2, 2, 0),
                   ([0, 1], 3, 3, 1), ([2, 3], 3, 3, 1)]
    # a cluster that persists over levels is one node with a level range
    persist = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 0, 0]])
    nodes = cluster_tree(persist, (2, 2))
    assert [(n.level, n.finest_level, n.parent) for n in nodes if n.patches.sum() == 2] == [(2, 3, 0), (2, 3, 0)]
