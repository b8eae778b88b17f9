"""COCO loading, the dataset mapper, the resumable sampler and the training loader."""
import itertools
import json

import numpy as np
import pytest
import torch

from cutler.data.build import TrainLoader, build_train_loader
from cutler.data.coco import AnnotationFileError, get_detection_dataset_dicts, load_coco_json
from cutler.data.mapper import DatasetMapper, MapperParams, shortest_edge_size
from cutler.data.samplers import TrainingBatchSampler
from cutler.structures.masks import masks_to_boxes
from test_data_fixtures import make_coco_dataset, register_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_coco_dataset(tmp_path_factory.mktemp("ds"), num_images=6, num_empty=1)


def test_load_coco_polygon_and_rle_masks_exact(tiny):
    recs = load_coco_json(tiny["json_file"], tiny["image_root"], class_agnostic=True)
    assert len(recs) == 6 and recs[-1]["annotations"] == []
    kinds = {type(a["segmentation"]).__name__ for r in recs for a in r["annotations"]}
    assert kinds == {"list", "dict"}  # both polygons and RLE are exercised
    mapper = DatasetMapper(MapperParams([10_000], 10_000, flip="none"))
    for r in recs[:-1]:
        # Shortest edge = its own size: no resize, so masks must equal the drawn rectangles exactly.
        mapper.params.min_sizes = [min(r["height"], r["width"])]
        out = mapper(r, np.random.default_rng(0))
        gt = tiny["masks"][r["image_id"]]
        assert out["image"].shape == (3, r["height"], r["width"]) and out["image"].dtype == torch.uint8
        assert torch.equal(out["instances"]["masks"], torch.from_numpy(gt))
        assert torch.equal(out["instances"]["boxes"], masks_to_boxes(torch.from_numpy(gt)))
        assert out["instances"]["classes"].tolist() == [0] * len(gt)


def test_shortest_edge_size_hand_computed():
    assert shortest_edge_size(48, 64, 96, 1000) == (96, 128)
    assert shortest_edge_size(48, 64, 96, 100) == (75, 100)  # the long side caps it: 64 * 100/64, 48 * 100/64 = 75
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    # Capped sizes whose exact value is x.5: Detectron2 scales (800, 1600) by fl(1333 / 1600) and gets
    # 666.4999..., so 666 (h * 1333/44 would give 666.5 -> 667); for 286x1612 its order gives 236.50...01 -> 237.
    assert shortest_edge_size(22, 44, 800, 1333) == (666, 1333)
    assert shortest_edge_size(286, 1612, 800, 1333) == (237, 1333)


def test_resize_and_flip_keep_boxes_and_masks_consistent(tiny):
    recs = load_coco_json(tiny["json_file"], tiny["image_root"], class_agnostic=True)
    plain = DatasetMapper(MapperParams([96], 1000, flip="none"))
    flip = DatasetMapper(MapperParams([96], 1000, flip="horizontal"))
    flipped_seen = 0
    for seed in range(8):
        a = plain(recs[0], np.random.default_rng(seed))
        b = flip(recs[0], np.random.default_rng(seed))
        assert a["image"].shape == (3, 96, 128) and (a["height"], a["width"]) == (48, 64)
        # Nearest-neighbour masks of rectangles scaled x2: the box of the mask is the scaled box.
        assert torch.allclose(masks_to_boxes(a["instances"]["masks"]), a["instances"]["boxes"])
        if torch.equal(b["image"], a["image"]):
            continue
        flipped_seen += 1
        assert torch.equal(b["image"], a["image"].flip(-1))
        assert torch.equal(b["instances"]["masks"], a["instances"]["masks"].flip(-1))
        ab = a["instances"]["boxes"]
        assert torch.allclose(b["instances"]["boxes"], torch.stack([128 - ab[:, 2], ab[:, 1], 128 - ab[:, 0], ab[:, 3]], 1))
        assert torch.allclose(masks_to_boxes(b["instances"]["masks"]), b["instances"]["boxes"])
    assert 0 < flipped_seen < 8


def _write_record(tmp_path, img, masks, category_ids=None):
    """A raw training record for ``img`` ((H, W, 3) uint8, written as PNG) with one RLE instance per mask
    (box = the mask's extent)."""
    from PIL import Image
    from pycocotools import mask as mask_util

    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    anns = []
    for i, m in enumerate(masks):
        rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        x, y, bw, bh = mask_util.toBbox(rle).tolist()
        anns.append({"bbox": [x, y, bw, bh], "category_id": i if category_ids is None else category_ids[i],
                     "iscrowd": 0, "segmentation": {"size": list(m.shape), "counts": rle["counts"].decode("ascii")}})
    return {"file_name": str(path), "height": img.shape[0], "width": img.shape[1], "image_id": 1, "annotations": anns}


@pytest.mark.parametrize("short,size", [(24, (24, 32)), (150, (150, 200))], ids=["shrink", "enlarge"])
def test_mapper_resizes_image_and_masks_exactly_like_detectron2(tmp_path, short, size):
    """Detectron2's ResizeTransform: PIL BILINEAR for the uint8 image, PIL NEAREST for bitmasks."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    masks = rng.random((3, 60, 80)) < 0.5  # noisy masks: every resampling rule shows up
    rec = _write_record(tmp_path, img, masks)
    out = DatasetMapper(MapperParams([short], 1000, flip="none"))(rec, np.random.default_rng(0))
    nh, nw = size
    ref = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), ref)
    ref_masks = np.stack([np.asarray(Image.fromarray(m.astype(np.uint8)).resize((nw, nh), Image.NEAREST)) for m in masks])
    assert np.array_equal(out["instances"]["masks"].numpy(), ref_masks.astype(bool))
    if short < 60:  # the reference is not OpenCV's bilinear (no antialiasing), so this test can tell them apart
        import cv2

        assert not np.array_equal(cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR), ref)


def test_resize_uint8_single_channel_and_dtype():
    from PIL import Image

    from cutler.data.mapper import resize_uint8

    m = (np.random.default_rng(1).random((30, 40)) < 0.5).astype(np.uint8)
    ref = np.asarray(Image.fromarray(m).resize((17, 13), Image.NEAREST))
    assert np.array_equal(resize_uint8(m, 13, 17, "nearest"), ref)
    assert np.array_equal(resize_uint8(m[:, :, None], 13, 17, "nearest"), ref[:, :, None])  # (H, W, 1) as Detectron2
    with pytest.raises(TypeError, match="uint8"):
        resize_uint8(m.astype(np.float32), 13, 17)


def test_mapper_drops_instances_whose_mask_vanished(tmp_path):
    """Detectron2's filter_empty_instances(by_mask=True): an instance whose box survives the resize but
    whose mask does not is dropped, with its box and class."""
    from PIL import Image

    img = np.zeros((60, 80, 3), np.uint8)
    dot = np.zeros((60, 80), bool)
    dot[0, 0] = True  # PIL NEAREST at 0.4x samples source rows/columns 1, 3, 6, ...: pixel (0, 0) is lost
    block = np.zeros((60, 80), bool)
    block[10:30, 20:50] = True
    rec = _write_record(tmp_path, img, [block, dot, block[::-1]], category_ids=[5, 6, 7])
    assert not np.asarray(Image.fromarray(dot.astype(np.uint8)).resize((32, 24), Image.NEAREST)).any()
    out = DatasetMapper(MapperParams([24], 1000, flip="none"))(rec, np.random.default_rng(0))
    inst = out["instances"]
    assert inst["classes"].tolist() == [5, 7]
    assert torch.allclose(inst["boxes"], torch.tensor([[8.0, 4.0, 20.0, 12.0], [8.0, 12.0, 20.0, 20.0]]))
    assert inst["masks"].shape == (2, 24, 32) and inst["masks"].flatten(1).any(1).all()
    # Box filtering alone would have kept it: its scaled box [0, 0, 0.4, 0.4] is not empty.
    assert torch.equal(inst["masks"][0], torch.from_numpy(
        np.asarray(Image.fromarray(block.astype(np.uint8)).resize((32, 24), Image.NEAREST)).astype(bool)))


def test_mapper_samples_at_most_max_instances_without_changing_other_draws(tmp_path):
    """dataloader.max_instances_per_image: a random subset (fixed by the sample's generator) of distinct
    annotations, in file order; the flip draw before it is unchanged, and images with fewer are untouched."""
    img = np.zeros((40, 40, 3), np.uint8)
    masks = []
    for k in range(10):
        m = np.zeros((40, 40), bool)
        m[k * 4:k * 4 + 3, k:k + 20] = True
        masks.append(m)
    rec = _write_record(tmp_path, img, masks)
    full = DatasetMapper(MapperParams([40], 1000, flip="horizontal"))
    capped = DatasetMapper(MapperParams([40], 1000, flip="horizontal", max_instances=4))
    flips = set()
    for seed in range(6):
        a = full(rec, np.random.default_rng(seed))["instances"]
        b = capped(rec, np.random.default_rng(seed))["instances"]
        c = capped(rec, np.random.default_rng(seed))["instances"]
        assert len(a["classes"]) == 10 and len(b["classes"]) == 4 and torch.equal(b["classes"], c["classes"])
        kept = b["classes"].tolist()
        assert kept == sorted(set(kept))  # distinct, in file order
        assert torch.equal(b["masks"], a["masks"][kept])  # same flip as without the cap
        flips.add(bool(a["masks"][0, 0, -1]))
    assert flips == {True, False}
    many = DatasetMapper(MapperParams([40], 1000, flip="horizontal", max_instances=10))
    assert torch.equal(many(rec, np.random.default_rng(1))["instances"]["masks"],
                       full(rec, np.random.default_rng(1))["instances"]["masks"])


def test_flipped_polygons_are_rasterised_after_flipping_like_detectron2(tmp_path):
    """Detectron2 scales and flips polygon coordinates, then rasterises (bitmask format); rasterising first
    and flipping the raster differs by a pixel for some polygons (pycocotools is not mirror-symmetric)."""
    from PIL import Image
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(0)
    h, w, nh, nw = 60, 80, 45, 60  # short edge 45: scale 0.75
    polys = [rng.uniform([0, 0], [w, h], (int(rng.integers(3, 9)), 2)) for _ in range(40)]
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    rec = {"file_name": str(tmp_path / "p.png"), "height": h, "width": w, "image_id": 1,
           "annotations": [{"bbox": [0, 0, w, h], "category_id": 0, "iscrowd": 0, "segmentation": [q.ravel().tolist()]}
                           for q in polys]}

    def raster(xy):
        return mask_util.decode(mask_util.merge(mask_util.frPyObjects([xy.ravel().tolist()], nh, nw))).astype(bool)

    mapper = DatasetMapper(MapperParams([nh], 1000, flip="horizontal"))
    plain = DatasetMapper(MapperParams([nh], 1000, flip="none"))(rec, np.random.default_rng(0))["image"]
    flips = set()
    for seed in range(6):
        out = mapper(rec, np.random.default_rng(seed))
        flipped = not torch.equal(out["image"], plain)  # the flip draw, read from the (noisy) image
        assert not flipped or torch.equal(out["image"], plain.flip(-1))
        flips.add(flipped)
        ref = []
        for q in polys:
            xy = q * (nw / w, nh / h)
            if flipped:
                xy[:, 0] = nw - xy[:, 0]
            ref.append(raster(xy))
        assert np.array_equal(out["instances"]["masks"].numpy(), np.stack(ref))
    assert flips == {True, False}
    # The check can fail: flipping the raster instead gives a different mask for some of these polygons.
    assert any(not np.array_equal(raster(q * (nw / w, nh / h))[:, ::-1],
                                  raster(np.stack([nw - q[:, 0] * nw / w, q[:, 1] * nh / h], 1))) for q in polys)


def test_annotation_file_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(AnnotationFileError, match="empty.json.*empty"):
        load_coco_json(empty, tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnnotationFileError, match="bad.json.*not valid JSON"):
        load_coco_json(bad, tmp_path)
    noimg = tmp_path / "noimg.json"
    noimg.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(AnnotationFileError, match="noimg.json lists no images"):
        load_coco_json(noimg, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_coco_json(tmp_path / "missing.json", tmp_path)
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}],
                                  "annotations": [{"id": 7, "image_id": 2, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(AnnotationFileError, match="orphan.json: annotation 7 refers to unknown image_id 2"):
        load_coco_json(orphan, tmp_path)


def test_filter_empty_annotations(tmp_path):
    register_tiny(tmp_path, "tiny_filter", num_images=5, num_empty=2)
    assert len(get_detection_dataset_dicts("tiny_filter", filter_empty=True)) == 3
    assert len(get_detection_dataset_dicts("tiny_filter", filter_empty=False)) == 5


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_deterministic_rank_disjoint_and_grouped():
    groups = np.array([0, 1] * 10)
    single = _take(TrainingBatchSampler(np.zeros(20, int), 4, seed=3), 10)
    assert [t.positions for t in single] == [list(range(4 * i, 4 * i + 4)) for i in range(10)]
    # Each epoch is a permutation of the dataset.
    assert sorted(sum((t.indices for t in single[:5]), [])) == list(range(20))
    ranks = [_take(TrainingBatchSampler(np.zeros(20, int), 2, seed=3, rank=r, world_size=2), 10) for r in range(2)]
    pos = [sorted(sum((t.positions for t in rk), [])) for rk in ranks]
    assert pos[0] == list(range(0, 40, 2)) and pos[1] == list(range(1, 40, 2))
    # Same global positions -> same dataset indices, whatever the world size.
    idx_single = {p: i for t in single for p, i in zip(t.positions, t.indices)}
    assert all(idx_single[p] == i for rk in ranks for t in rk for p, i in zip(t.positions, t.indices))
    grouped = _take(TrainingBatchSampler(groups, 3, seed=0), 12)
    assert all(len({groups[i] for i in t.indices}) == 1 for t in grouped)


def test_sampler_state_restores_exact_continuation():
    groups = np.array([0, 1, 1] * 7)
    s = TrainingBatchSampler(groups, 3, seed=5, rank=1, world_size=2)
    it = iter(s)
    first = [next(it) for _ in range(7)]
    rest = [next(it) for _ in range(6)]
    resumed = _take(TrainingBatchSampler(groups, 3, seed=5, rank=1, world_size=2, state=first[-1].state), 6)
    assert [(t.positions, t.indices, t.batch_no) for t in resumed] == [(t.positions, t.indices, t.batch_no) for t in rest]


def _digest(batch):
    return [(d["file_name"], d["image"].sum().item(), d["instances"]["boxes"].tolist()) for d in batch["inputs"]]


def test_loader_workers_match_main_process_and_resume_from_state(tmp_path):
    info = make_coco_dataset(tmp_path, num_images=8)
    recs = load_coco_json(info["json_file"], info["image_root"], class_agnostic=True)
    mapper = DatasetMapper(MapperParams([32, 48, 64], 200))
    ref_loader = TrainLoader(recs, mapper, 2, seed=1, num_workers=0)
    ref = [_digest(b) for b in itertools.islice(ref_loader, 6)]
    loader = TrainLoader(recs, mapper, 2, seed=1, num_workers=2)
    it = iter(loader)
    got = [_digest(next(it)) for _ in range(3)]
    state = loader.state_dict()  # workers have prefetched further; the state is the consumed position
    got += [_digest(next(it)) for _ in range(3)]
    del it
    assert got == ref
    resumed = TrainLoader(recs, mapper, 2, seed=1, num_workers=0, state=state)
    assert [_digest(b) for b in itertools.islice(resumed, 3)] == ref[3:]


def test_bad_image_is_skipped_not_fatal(tmp_path, caplog):
    from cutler.config import load_config

    info = register_tiny(tmp_path, "tiny_bad", num_images=4)
    bad = info["image_root"] / "img_001.png"
    bad.write_bytes(b"not a png")
    cfg = load_config(None, ["datasets.train=[tiny_bad]", f"datasets.root={tmp_path}", "model.roi_heads.num_classes=1",
                             "solver.ims_per_batch=4", "dataloader.num_workers=0", "input.min_size_train=[32]",
                             "dataloader.aspect_ratio_grouping=false", f"output_dir={tmp_path}/out"])
    batch = next(iter(build_train_loader(cfg, seed=0, rank=0, world_size=1)))
    assert len(batch["inputs"]) == 4
    assert str(bad) in batch["skipped"]
    assert all(d["file_name"] != str(bad) for d in batch["inputs"])


def test_copy_paste_in_loader_and_visualization(tmp_path):
    from cutler.config import load_config

    register_tiny(tmp_path, "tiny_vis", num_images=4)
    cfg = load_config(None, ["datasets.train=[tiny_vis]", f"datasets.root={tmp_path}", "model.roi_heads.num_classes=1",
                             "solver.ims_per_batch=2", "dataloader.num_workers=0", "input.min_size_train=[32]",
                             "dataloader.copy_paste=true", "dataloader.copy_paste_rate=1.0",
                             "dataloader.visualize_copy_paste=true", f"output_dir={tmp_path}/out"])
    batches = list(itertools.islice(build_train_loader(cfg, seed=0, rank=0, world_size=1), 2))
    for b in batches:
        for d in b["inputs"]:
            inst = d["instances"]
            assert torch.equal(inst["boxes"], masks_to_boxes(inst["masks"])) and inst["masks"].sum(0).max() <= 1
    pngs = sorted(p.name for p in (tmp_path / "out" / "copy_paste_vis").glob("*.png"))
    assert pngs == ["rank0_batch0_0.png", "rank0_batch0_1.png", "rank0_batch1_0.png", "rank0_batch1_1.png"]
