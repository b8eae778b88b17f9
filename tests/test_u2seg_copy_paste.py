"""U2Seg's same-cluster copy-paste: the pasted instance is of a class the target already holds, its pixels and
mask come from a source instance of that class, and CutLER's copy-paste stays the default."""
import numpy as np
import pytest
import torch

from cutler.config import load_config
from cutler.data.build import build_train_loader
from cutler.data.copy_paste import CopyPasteParams
from cutler.structures.masks import masks_to_boxes
from cutler.u2seg.copy_paste import SameClusterCopyPaste, build_copy_paste, transform_instance

H = W = 40


def _mapped(rects, classes, value):
    """A mapped sample: flat background ``value``; instance i is a rectangle painted ``value + 10 * (cls + 1)``."""
    img = torch.full((3, H, W), value, dtype=torch.uint8)
    masks = torch.zeros((len(rects), H, W), dtype=torch.bool)
    for i, ((y0, x0, y1, x1), c) in enumerate(zip(rects, classes)):
        masks[i, y0:y1, x0:x1] = True
        img[:, y0:y1, x0:x1] = value + 10 * (c + 1)
    return {"image": img, "height": H, "width": W,
            "instances": {"boxes": masks_to_boxes(masks), "classes": torch.tensor(classes, dtype=torch.int64),
                          "masks": masks}}


# Records: the instances' classes are all the index needs; the "mapper" draws the sample from the record.
RECORDS = [
    {"id": 0, "annotations": [{"category_id": 0}, {"category_id": 1}], "sample": ([(2, 2, 8, 8), (20, 20, 30, 36)], [0, 1], 0)},
    {"id": 1, "annotations": [{"category_id": 2}], "sample": ([(5, 5, 15, 15)], [2], 100)},
    {"id": 2, "annotations": [{"category_id": 1}, {"category_id": 2}], "sample": ([(1, 1, 9, 12), (25, 3, 35, 10)], [1, 2], 150)},
    {"id": 3, "annotations": [{"category_id": 1, "iscrowd": 1}], "sample": ([], [], 50)},
]


def _mapper(record, rng):
    return _mapped(*record["sample"])


def test_index_lists_records_per_class_without_crowd():
    cp = SameClusterCopyPaste(RECORDS, CopyPasteParams(rate=1.0), seed=0)
    assert cp.sources(0).tolist() == [0] and cp.sources(1).tolist() == [0, 2] and cp.sources(2).tolist() == [1, 2]
    assert cp.sources(5).tolist() == []


def test_pasted_instance_is_of_a_class_the_target_holds_and_comes_from_such_a_source():
    params = CopyPasteParams(rate=1.0, min_ratio=0.5, max_ratio=1.0)
    cp = SameClusterCopyPaste(RECORDS, params, seed=0)
    pasted = 0
    for trial in range(30):
        target = _mapped([(30, 30, 38, 38)], [2], 200)  # holds class 2 only: sources are records 1 and 2
        out = cp([target], [trial], torch.Generator().manual_seed(trial), RECORDS, _mapper)[0]
        if out is target:
            continue
        pasted += 1
        inst = out["instances"]
        assert inst["classes"].tolist()[-1] == 2 and len(inst["classes"]) in (1, 2)
        new = inst["masks"][-1]
        # Class-2 pixels are painted 100 + 30 (record 1) or 150 + 30 (record 2); the pasted mask carries them.
        values = set(out["image"][0][new].unique().tolist())
        assert values <= {130, 180} and values, values
        assert torch.equal(inst["boxes"], masks_to_boxes(inst["masks"]))
        assert inst["masks"].sum(0).max() <= 1  # only the target's masks are cut
        assert torch.equal(out["image"][:, ~inst["masks"].any(0)], target["image"][:, ~inst["masks"].any(0)])
    assert pasted > 15
    # Same generator state: same result (the source's augmentation is seeded by the stream position).
    t = _mapped([(30, 30, 38, 38)], [2], 200)
    a = cp([t], [3], torch.Generator().manual_seed(3), RECORDS, _mapper)[0]
    b = cp([t], [3], torch.Generator().manual_seed(3), RECORDS, _mapper)[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["instances"]["masks"], b["instances"]["masks"])


def test_nothing_is_pasted_without_target_instances_or_at_rate_zero():
    cp = SameClusterCopyPaste(RECORDS, CopyPasteParams(rate=1.0), seed=0)
    empty = _mapped([], [], 10)
    assert cp.paste(empty, 0, torch.Generator().manual_seed(0), RECORDS, _mapper) is empty
    never = SameClusterCopyPaste(RECORDS, CopyPasteParams(rate=0.0), seed=0)
    t = _mapped([(2, 2, 8, 8)], [0], 10)
    assert never.paste(t, 0, torch.Generator().manual_seed(0), RECORDS, _mapper) is t


def test_transform_cuts_the_instance_box_and_fits_it_into_the_target():
    image = torch.arange(3 * 20 * 30, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 20, 30)
    mask = torch.zeros(20, 30, dtype=torch.bool)
    mask[4:10, 6:16] = True
    pixels, m = transform_instance(image, mask, 1.0, (40, 40))
    assert m.shape == (6, 10) and m.all() and torch.equal(pixels, image[:, 4:10, 6:16])
    pixels, m = transform_instance(image, mask, 2.0, (8, 40))  # 12 x 20 does not fit 8 rows: shrunk, same aspect
    assert m.shape == (8, 13)


def test_cutler_pairing_stays_the_default(synthetic_root):
    base = ["model.roi_heads.num_classes=1", f"datasets.root={synthetic_root}", "datasets.train=[synthetic_train]",
            "dataloader.copy_paste=true", "dataloader.num_workers=0", "input.min_size_train=[64]",
            "input.max_size_train=96"]
    assert isinstance(build_copy_paste(load_config(None, base), [], CopyPasteParams(), 0), CopyPasteParams)
    with pytest.raises(ValueError, match="cluster labels"):
        build_copy_paste(load_config(None, base + ["u2seg.copy_paste_pairing=same_cluster"]), [], CopyPasteParams(), 0)
    with pytest.raises(ValueError, match="copy_paste_pairing"):
        build_copy_paste(load_config(None, base + ["u2seg.copy_paste_pairing=similar"]), [], CopyPasteParams(), 0)
    # A class-aware loader over the shape classes pastes same-class instances; too few classes is an error.
    aware = ["model.roi_heads.num_classes=5", "datasets.train=[synthetic_shapes_train]",
             "u2seg.copy_paste_pairing=same_cluster", "dataloader.copy_paste_rate=1.0", "solver.ims_per_batch=2"]
    loader = build_train_loader(load_config(None, base + aware), seed=0)
    assert isinstance(loader.dataset.copy_paste, SameClusterCopyPaste)
    batch = next(iter(loader))["inputs"]
    assert all(0 <= int(c) < 5 for d in batch for c in d["instances"]["classes"])
    with pytest.raises(ValueError, match="num_classes=3"):
        build_train_loader(load_config(None, base + aware[1:] + ["model.roi_heads.num_classes=3"]), seed=0)


def _overrides(root):
    return ["model.roi_heads.num_classes=5", f"datasets.root={root}", "datasets.train=[synthetic_shapes_train]",
            "dataloader.copy_paste=true", "dataloader.copy_paste_rate=1.0", "u2seg.copy_paste_pairing=same_cluster",
            "input.min_size_train=[64]", "input.max_size_train=96", "solver.ims_per_batch=2", "dataloader.num_workers=0"]


def test_same_cluster_batches_do_not_depend_on_workers(synthetic_root):
    cfg = load_config(None, _overrides(synthetic_root))
    a = [b["inputs"] for _, b in zip(range(3), build_train_loader(cfg, seed=5))]
    workers = load_config(None, _overrides(synthetic_root) + ["dataloader.num_workers=1"])
    b = [b["inputs"] for _, b in zip(range(3), build_train_loader(workers, seed=5))]
    for x, y in zip(a, b):
        for d, e in zip(x, y):
            assert torch.equal(d["image"], e["image"]) and np.array_equal(d["instances"]["classes"], e["instances"]["classes"])
