"""UnSAM bookkeeping: mask NMS, parents after removals, part masks back to the frame, annotations with levels
and parents that survive the chunk writer and its merge."""
import json

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from cutler.maskcut.writer import ShardWriter, merge_outputs
from cutler.unsam.hierarchy import mask_nms, nms_order, resolve_parents
from cutler.unsam.postprocess import ImageHierarchy, MergeSettings, build_candidates, refine_window, tight_box


def test_nms_visits_coarser_levels_first_then_larger_areas():
    ious = np.array([[1.0, 0.95, 0.1], [0.95, 1.0, 0.0], [0.1, 0.0, 1.0]])
    # mask 1 is larger but of a finer level: the level-0 mask 0 is kept, 1 is its duplicate
    order = nms_order([0, 2, 1], [100, 120, 30])
    assert order.tolist() == [0, 2, 1]
    keep, by = mask_nms(ious, order, 0.9)
    assert keep.tolist() == [True, False, True] and by.tolist() == [-1, 0, -1]
    # ties in level and area keep the input order; IoU exactly at the threshold is not a duplicate
    keep, by = mask_nms(np.array([[1.0, 0.9], [0.9, 1.0]]), nms_order([1, 1], [5, 5]), 0.9)
    assert keep.tolist() == [True, True]
    # a suppressed mask does not suppress others (greedy NMS)
    ious = np.array([[1, 0.95, 0.0], [0.95, 1, 0.95], [0.0, 0.95, 1]])
    keep, by = mask_nms(ious, [0, 1, 2], 0.9)
    assert keep.tolist() == [True, False, True] and by.tolist() == [-1, 0, -1]


def test_parents_after_removals():
    # tree A: 0 -> 1 -> 2 -> 3 ; tree B: 4 -> 5
    parent = [-1, 0, 1, 2, -1, 4]
    alive = [True] * 6
    assert resolve_parents(parent, alive, [-1] * 6) == parent
    # 2 dropped without replacement: 3 hangs under 1
    alive = [True, True, False, True, True, True]
    assert resolve_parents(parent, alive, [-1] * 6) == [-1, 0, -1, 1, -1, 4]
    # root 0 suppressed by 4 (a duplicate from tree B): 1 hangs under 4
    alive = [False, True, True, True, True, True]
    assert resolve_parents(parent, alive, [4, -1, -1, -1, -1, -1]) == [-1, 4, 1, 2, -1, 4]
    # 1 suppressed by its own descendant 3: 2 cannot hang under 3 (a cycle), it goes up to 0; 3 goes to 2
    alive = [True, False, True, True, True, True]
    assert resolve_parents(parent, alive, [-1, 3, -1, -1, -1, -1]) == [-1, -1, 0, 2, -1, 4]
    # replacement chains: 1 replaced by 5, 5 replaced by 4 -> 2 hangs under 4
    alive = [True, False, True, True, True, False]
    assert resolve_parents(parent, alive, [-1, 5, -1, -1, -1, 4]) == [-1, -1, 4, 2, -1, -1]


def _square(size, x0, y0, x1, y1):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_parts_back_to_the_frame_coverage_filter_and_annotations():
    size = 64
    divide = _square(size, 16, 16, 48, 48)  # a 32x32 object; its box is exactly the mask
    # 4x4 patch grid over the box, finest first: 3 levels
    #   level 3 (0.6): left half {cols 0,1} split in top/bottom, right half one cluster
    #   level 2: left half one cluster, right half one cluster
    #   level 1: everything one cluster (the whole box, a duplicate of the divide mask)
    lab3 = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [8, 8, 2, 2], [8, 8, 2, 2]]).reshape(-1)
    lab2 = np.array([[0, 0, 2, 2]] * 4).reshape(-1)
    lab1 = np.zeros(16, int)
    settings = MergeSettings(grid_hw=(4, 4), min_patches=2, min_coverage=0.9, nms_iou=0.9, crf="none")
    cand, counts = build_candidates([divide], [0.8], [np.stack([lab3, lab2, lab1])], settings)
    assert counts == {"divide": 1, "parts": 5, "parts_kept": 5}
    assert cand.levels == [0, 1, 2, 2, 3, 3] and cand.parents == [-1, 0, 1, 1, 2, 2]
    left = mask_util.decode(cand.rles[2]).astype(bool)
    assert left.sum() == 16 * 32 and left[16:48, 16:32].all()  # the left half of the box, in frame pixels

    hier = ImageHierarchy(np.zeros((size, size, 3), np.uint8), 128, 96, cand, settings)
    hier.nms()  # the level-1 cluster (the whole box) duplicates the divide mask
    assert hier.alive.tolist() == [True, False, True, True, True, True] and hier.replaced_by[1] == 0
    hier.apply_refinement(None)
    anns = hier.annotations()
    by_id = {a["id"]: a for a in anns}
    assert [(a["level"], a["parent"]) for a in anns] == [(0, None), (2, 1), (2, 1), (3, 3), (3, 3)]
    assert by_id[1]["score"] == 0.8 and "score" not in by_id[3]
    # masks come back at the original size (128 x 96): the object covers x 32..96, y 24..72
    assert mask_util.decode(by_id[1]["segmentation"]).shape == (96, 128)
    assert by_id[1]["bbox"] == [32.0, 24.0, 64.0, 48.0]

    # a part mostly outside its divide mask (a background cluster of the box) is not kept; its children
    # are re-attached to the divide mask
    shape_l = divide.copy()
    shape_l[18:48, 32:48] = False  # the object: the left half of the box and a 2-pixel strip along its top
    cand, counts = build_candidates([shape_l], [0.8], [np.stack([lab3, lab2, lab1])], settings)
    assert counts["parts_kept"] == 3 and cand.levels == [0, 2, 3, 3] and cand.parents == [-1, 0, 1, 1]


def test_refine_window_is_a_clipped_square_around_the_box():
    assert refine_window((10, 10, 20, 30), 100, 2.0) == (0, 0, 35, 40)
    assert refine_window((40, 40, 50, 50), 100, 2.0) == (35, 35, 55, 55)
    assert tight_box(np.zeros((4, 4), bool)) is None and tight_box(_square(8, 2, 3, 5, 7)) == (2, 3, 5, 7)


def test_parent_ids_survive_the_chunk_writer_and_merge(tmp_path):
    def ann(local_id, parent, x0):
        m = _square(16, x0, 0, x0 + 4, 4)
        rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        return {"id": local_id, "parent": parent, "segmentation": rle, "area": 16.0, "bbox": [x0, 0, 4, 4],
                "iscrowd": 0, "category_id": 1}

    w = ShardWriter(tmp_path / "shards" / "shard-00000-of-00001", chunk_size=2)
    w.add(7, "a.png", 16, 16, [ann(1, None, 0), ann(3, 1, 4), ann(2, 3, 8)])
    w.add(8, "b.png", 16, 16, [ann(5, None, 0), ann(9, 5, 4)])
    w.add(9, "c.png", 16, 16, [ann(1, None, 2)])
    w.close()
    merge_outputs(tmp_path, tmp_path / "out.json")
    coco = COCO(str(tmp_path / "out.json"))
    anns = json.loads((tmp_path / "out.json").read_text())["annotations"]
    assert [(a["id"], a["image_id"], a["parent"]) for a in anns] == [(1, 7, None), (2, 7, 1), (3, 7, 2), (4, 8, None),
                                                                     (5, 8, 4), (6, 9, None)]
    assert all(coco.anns[a["parent"]]["image_id"] == a["image_id"] for a in anns if a["parent"])
