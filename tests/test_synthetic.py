"""The synthetic dataset: deterministic, read back by pycocotools with areas/boxes matching the masks."""
import json

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO

from cutler.data.catalog import get_dataset
from cutler.data.synthetic import ensure_synthetic_dataset, render_image
from cutler.utils.image import read_image_rgb


def test_pycocotools_reads_it_back_and_masks_match_areas_and_boxes(synthetic_root):
    ds = get_dataset("synthetic_train", synthetic_root)
    coco = COCO(str(ds.json_file))
    assert len(coco.imgs) == 12 and coco.getCatIds() == [1]
    counts = []
    for img_id, info in coco.imgs.items():
        image = read_image_rgb(ds.image_root / info["file_name"])
        assert image.shape == (info["height"], info["width"], 3)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        counts.append(len(anns))
        union = np.zeros(image.shape[:2], np.int32)
        for ann in anns:
            m = coco.annToMask(ann)
            assert m.shape == image.shape[:2]
            assert ann["area"] == m.sum() > 0
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            union += m
        assert union.max() == 1, "visible masks of one image must not overlap"
    assert 1 <= min(counts) and max(counts) <= 6 and len(set(counts)) > 1


def test_deterministic_and_prefix_stable(tmp_path):
    a = ensure_synthetic_dataset(tmp_path / "a", num_train=3, num_val=1, seed=5)
    b = ensure_synthetic_dataset(tmp_path / "b", num_train=5, num_val=1, seed=5)
    ja, jb = (json.load(open(p["train"].json_file)) for p in (a, b))
    assert ja["annotations"] == [x for x in jb["annotations"] if x["image_id"] <= 3]
    img1, masks1 = render_image(5, "train", 2)
    img2, masks2 = render_image(5, "train", 2)
    assert np.array_equal(img1, img2) and all(np.array_equal(x, y) for x, y in zip(masks1, masks2))
    assert not np.array_equal(render_image(6, "train", 2)[0].shape, ()) and \
        not np.array_equal(render_image(6, "train", 0)[0][:10, :10], render_image(5, "train", 0)[0][:10, :10])


def test_regenerates_only_when_parameters_change(tmp_path):
    paths = ensure_synthetic_dataset(tmp_path, num_train=2, num_val=1)
    mtime = paths["train"].json_file.stat().st_mtime_ns
    ensure_synthetic_dataset(tmp_path, num_train=2, num_val=1)
    assert paths["train"].json_file.stat().st_mtime_ns == mtime
    ensure_synthetic_dataset(tmp_path, num_train=3, num_val=1)
    assert len(json.load(open(paths["train"].json_file))["images"]) == 3


def test_rle_counts_are_strings_and_decode(synthetic_root):
    ds = get_dataset("synthetic_val", synthetic_root)
    data = json.load(open(ds.json_file))
    rle = data["annotations"][0]["segmentation"]
    assert isinstance(rle["counts"], str)
    assert mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).sum() == data["annotations"][0]["area"]


def test_parts_variant_adds_inner_parts_to_the_same_scenes(tmp_path):
    """The parts variant keeps each scene (objects, and every pixel outside the parts) and adds contained parts
    with levels and parents; the default dataset is generated as before, in its own folder."""
    from cutler.data.synthetic import render_image_with_parts

    for i in range(4):
        plain, objects = render_image(0, "train", i)
        image, objects_p, parts = render_image_with_parts(0, "train", i)
        assert all(np.array_equal(a, b) for a, b in zip(objects, objects_p)) and len(objects) == len(objects_p)
        painted = np.zeros(plain.shape[:2], bool)
        for p in parts:
            container = objects[p.container] if p.depth == 1 else parts[p.container].mask
            assert p.mask.any() and not (p.mask & ~container).any()
            painted |= p.mask
        assert np.array_equal(image[~painted], plain[~painted])
    paths = ensure_synthetic_dataset(tmp_path, num_train=4, num_val=1, parts=True)
    assert paths["train"].json_file == tmp_path / "synthetic_parts" / "train" / "annotations.json"
    assert get_dataset("synthetic_parts_train", tmp_path).json_file == paths["train"].json_file
    coco = COCO(str(paths["train"].json_file))
    levels = [a["level"] for a in coco.anns.values()]
    assert {0, 1, 2} <= set(levels)
    for a in coco.anns.values():
        if a["level"] == 0:
            assert a["parent"] is None
            continue
        parent = coco.anns[a["parent"]]
        assert parent["image_id"] == a["image_id"] and parent["level"] == a["level"] - 1
        m, pm = coco.annToMask(a).astype(bool), coco.annToMask(parent).astype(bool)
        assert a["area"] == m.sum() > 0 and not (m & ~pm).any()
    plain = ensure_synthetic_dataset(tmp_path, num_train=4, num_val=1)
    anns = json.load(open(plain["train"].json_file))["annotations"]
    assert all("level" not in a and "parent" not in a for a in anns)
    assert len(anns) == sum(1 for lv in levels if lv == 0)
