"""Panoptic benchmarks in the form the U2Seg evaluation uses (COCO panoptic PNG + JSON, integer image ids).

* COCO panoptic val2017: the 80 thing categories as they are; the 53 stuff categories merged into their 15
  supercategories (textile, building, raw-material, furniture-stuff, floor, plant, food-stuff, ground,
  structural, water, wall, window, ceiling, sky, solid), as the published evaluation does. The segments of one
  image that fall into the same supercategory become ONE segment (the published conversion relabels them but
  keeps them apart, so that one stuff prediction can match only one of them). Optionally a semantic map per
  image over the 27 COCO-Stuff supercategories (12 thing + 15 stuff), for PixelAcc / mIoU.
* Cityscapes val: cityscapesscripts' ``convert2panoptic`` on ``gtFine`` (19 evaluated classes: 8 things, 11
  stuff, category ids = Cityscapes label ids), with image entries renumbered ``1..N`` and pointing at
  ``leftImg8bit/val/<city>/<name>_leftImg8bit.png``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from cutler.utils.io import atomic_write_bytes, atomic_write_json

from .panoptic import encode_png, load_panoptic_json, read_panoptic_png, segments_from_ids, write_panoptic_png

STUFF_ID_OFFSET = 200  # merged stuff supercategories get ids 201, 202, ... (COCO's own ids stop at 200)


def convert_coco_panoptic(panoptic_json: os.PathLike | str, panoptic_dir: os.PathLike | str,
                          out_json: os.PathLike | str, out_dir: os.PathLike | str,
                          semantic_dir: Optional[os.PathLike | str] = None) -> Dict[str, Any]:
    """COCO panoptic -> things + 15 stuff supercategories (see the module docstring).

    Args:
        panoptic_json, panoptic_dir: ``panoptic_val2017.json`` and its PNG folder.
        out_json, out_dir: the converted JSON and PNG folder.
        semantic_dir: also write ``<stem>.png`` maps of COCO-Stuff-27 supercategory indices (255 = void or crowd).

    Returns:
        counts ``{"images", "segments", "things", "stuff"}``.
    """
    data = load_panoptic_json(panoptic_json)
    cats = data["categories"]
    stuff_supers: List[str] = []
    for c in sorted(cats, key=lambda c: c["id"]):
        if not c.get("isthing", 0) and c["supercategory"] not in stuff_supers:
            stuff_supers.append(c["supercategory"])
    new_id = {int(c["id"]): (int(c["id"]) if c.get("isthing", 0) else STUFF_ID_OFFSET + 1 + stuff_supers.index(c["supercategory"]))
              for c in cats}
    out_cats = [c for c in cats if c.get("isthing", 0)]
    out_cats += [{"id": STUFF_ID_OFFSET + 1 + i, "name": s, "supercategory": s, "isthing": 0}
                 for i, s in enumerate(stuff_supers)]
    thing_supers: List[str] = []
    for c in sorted(cats, key=lambda c: c["id"]):
        if c.get("isthing", 0) and c["supercategory"] not in thing_supers:
            thing_supers.append(c["supercategory"])
    semantic_index = {int(c["id"]): (thing_supers.index(c["supercategory"]) if c.get("isthing", 0)
                                     else len(thing_supers) + stuff_supers.index(c["supercategory"])) for c in cats}
    out_dir = Path(out_dir)
    annotations = []
    n_segments = 0
    for ann in data["annotations"]:
        ids = read_panoptic_png(Path(panoptic_dir) / ann["file_name"])
        out_ids = np.zeros_like(ids)
        seg_cat: Dict[int, int] = {}
        crowd: Dict[int, int] = {}
        first_stuff: Dict[int, int] = {}
        sem = np.full(ids.shape, 255, np.uint8)
        for s in ann["segments_info"]:
            cat = new_id[int(s["category_id"])]
            m = ids == s["id"]
            target = int(s["id"])
            if cat > STUFF_ID_OFFSET:
                target = first_stuff.setdefault(cat, int(s["id"]))
            out_ids[m] = target
            seg_cat[target] = cat
            crowd[target] = max(crowd.get(target, 0), int(s.get("iscrowd", 0)))
            if not s.get("iscrowd", 0):
                sem[m] = semantic_index[int(s["category_id"])]
        write_panoptic_png(out_dir / ann["file_name"], out_ids)
        if semantic_dir is not None:
            atomic_write_bytes(Path(semantic_dir) / ann["file_name"], encode_png(sem))
        segs = segments_from_ids(out_ids, seg_cat, crowd)
        n_segments += len(segs)
        annotations.append({"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": segs})
    atomic_write_json(out_json, {"info": {"description": "COCO panoptic with stuff supercategories (cutler)"},
                                 "images": data["images"], "annotations": annotations, "categories": out_cats})
    return {"images": len(annotations), "segments": n_segments, "things": sum(c["isthing"] for c in out_cats),
            "stuff": len(stuff_supers)}


def convert_cityscapes_panoptic(cityscapes_root: os.PathLike | str, out_json: os.PathLike | str,
                                out_dir: os.PathLike | str, split: str = "val") -> Dict[str, Any]:
    """Cityscapes ``gtFine`` -> COCO panoptic with cityscapesscripts (see the module docstring).

    Args:
        cityscapes_root: the folder holding ``gtFine/`` and ``leftImg8bit/``.
        out_json, out_dir: the converted JSON and PNG folder.
        split: ``"val"`` (the benchmark), ``"train"``...

    Raises:
        FileNotFoundError: no ``gtFine/<split>/*/*_instanceIds.png`` under the root.
    """
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    root = Path(cityscapes_root)
    if not list((root / "gtFine" / split).glob("*/*_instanceIds.png")):
        raise FileNotFoundError(f"no {root}/gtFine/{split}/*/*_instanceIds.png: give the Cityscapes root with gtFine/ "
                                "(run cityscapesscripts' csCreateTrainIdInstanceImgs first if the instanceIds are missing)")
    with tempfile.TemporaryDirectory() as tmp:
        convert2panoptic(str(root / "gtFine"), tmp, useTrainId=False, setNames=[split])
        data = json.loads((Path(tmp) / f"cityscapes_panoptic_{split}.json").read_text())
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        id_of = {}
        images = []
        for i, im in enumerate(sorted(data["images"], key=lambda im: im["id"]), start=1):
            name = str(im["id"])  # <city>_<sequence>_<frame>
            id_of[im["id"]] = i
            images.append({"id": i, "file_name": f"{name.split('_')[0]}/{name}_leftImg8bit.png",
                           "height": im["height"], "width": im["width"], "cityscapes_id": name})
        annotations = []
        for ann in data["annotations"]:
            shutil.copy(Path(tmp) / f"cityscapes_panoptic_{split}" / ann["file_name"], out_dir / ann["file_name"])
            annotations.append({**ann, "image_id": id_of[ann["image_id"]]})
    atomic_write_json(out_json, {"info": {"description": f"Cityscapes {split} panoptic (cutler, cityscapesscripts)"},
                                 "images": images, "annotations": annotations, "categories": data["categories"]})
    return {"images": len(images), "segments": sum(len(a["segments_info"]) for a in annotations),
            "things": sum(c["isthing"] for c in data["categories"]),
            "stuff": sum(not c["isthing"] for c in data["categories"])}


__all__ = ["STUFF_ID_OFFSET", "convert_cityscapes_panoptic", "convert_coco_panoptic"]
