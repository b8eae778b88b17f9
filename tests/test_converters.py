"""Converters on small fixtures written by the tests; outputs are read back with pycocotools."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from cutler.evaluation.coco_eval import evaluate_coco
from cutler.evaluation.converters import (
    convert_coco_style,
    convert_kitti,
    convert_openimages,
    convert_voc,
    write_coco_json,
)

REPO = Path(__file__).resolve().parents[1]


def _img(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def _read_back(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _gt_as_results(data):
    return [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 1.0, "category_id": 1}
            for a in data["annotations"] if not a["iscrowd"]]


def _voc_xml(name, w, h, objects):
    objs = "".join(
        f"<object><name>{cls}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for cls, d, b in objects)
    return (f"<annotation><filename>{name}.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations" / "000001.xml").write_text(
        _voc_xml("000001", 353, 500, [("dog", 0, (48, 240, 195, 371)), ("person", 1, (8, 12, 352, 498))]))
    # size 0 in the XML (happens in VOC-style sets): the converter must read the image header
    (root / "Annotations" / "000002.xml").write_text(_voc_xml("000002", 0, 0, [("car", 0, (1, 1, 10, 20))]))
    _img(root / "JPEGImages" / "000002.jpg", 64, 48)
    (root / "Annotations" / "000003.xml").write_text(_voc_xml("000003", 100, 100, [("cat", 0, (5, 5, 50, 60))]))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("000003\n000001\n")
    return root


def test_voc_boxes_sizes_difficult_and_splits(voc_root, tmp_path):
    data = convert_voc(voc_root, ["trainval"])
    assert [i["file_name"] for i in data["images"]] == ["000001.jpg", "000002.jpg"]
    assert (data["images"][1]["width"], data["images"][1]["height"]) == (64, 48)
    a = data["annotations"][0]
    assert a["bbox"] == [47.0, 239.0, 148.0, 132.0]  # 1-based inclusive corners: w = 195 - 48 + 1
    assert a["area"] == 148.0 * 132.0 and a["category_id"] == 1
    assert len(data["annotations"]) == 3 and data["annotations"][1]["iscrowd"] == 0  # difficult kept

    ignored = convert_voc(voc_root, ["trainval"], difficult="ignore")
    assert [x["iscrowd"] for x in ignored["annotations"]] == [0, 1, 0]
    assert len(convert_voc(voc_root, ["trainval"], difficult="drop")["annotations"]) == 2

    both = convert_voc(voc_root, ["trainval", "test"])  # 000001 is in both sets: listed once
    assert [i["file_name"] for i in both["images"]] == ["000001.jpg", "000002.jpg", "000003.jpg"]

    out = write_coco_json(both, tmp_path / "voc.json")
    coco = _read_back(out)
    assert coco.getCatIds() == [1] and len(coco.getImgIds()) == 3
    m = evaluate_coco(out, _gt_as_results(both), iou_types=["bbox"])["bbox"]
    assert m["AP"] == pytest.approx(100.0)


def test_voc_cli_writes_the_same_json(voc_root, tmp_path, monkeypatch, capsys):
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "datasets"))  # what running the script puts first on sys.path
    spec = importlib.util.spec_from_file_location("convert_voc", REPO / "datasets" / "convert_voc.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "cli.json"
    cli.main(["--root", str(voc_root), "--splits", "trainval", "test", "--output", str(out)])
    assert "3 images, 4 annotations (0 crowd/ignore), 1 category" in capsys.readouterr().out
    assert json.loads(out.read_text())["annotations"] == convert_voc(voc_root, ["trainval", "test"])["annotations"]


def test_kitti_labels_dontcare_and_image_sizes(tmp_path):
    labels, images = tmp_path / "label_2", tmp_path / "image_2"
    labels.mkdir()
    _img(images / "000000.png", 120, 40)
    _img(images / "000001.png", 100, 30)
    (labels / "000000.txt").write_text(
        "Car 0.00 0 -1.58 10.50 5.25 60.00 30.75 1.67 1.87 3.69 -16.53 2.39 58.49 1.57\n"
        "DontCare -1 -1 -10 80.00 0.00 119.00 20.00 -1 -1 -1 -1000 -1000 -1000 -10\n"
        "Pedestrian 0.00 0 0.21 100.00 10.00 140.00 39.00 1.89 0.48 1.20 1.84 1.47 8.41 0.01\n")
    (labels / "000001.txt").write_text("")  # an image without objects stays in the set
    (labels / "000002.txt").write_text("Car 0 0 0 1 1 5 5 0 0 0 0 0 0 0\n")  # no image: skipped
    data = convert_kitti(labels, images)
    assert [i["file_name"] for i in data["images"]] == ["000000.png", "000001.png"]
    assert (data["images"][0]["width"], data["images"][0]["height"]) == (120, 40)
    car, dontcare, ped = data["annotations"]
    assert car["bbox"] == pytest.approx([10.5, 5.25, 49.5, 25.5]) and car["iscrowd"] == 0
    assert dontcare["iscrowd"] == 1
    assert ped["bbox"] == pytest.approx([100.0, 10.0, 20.0, 29.0])  # clipped at the image's right edge
    assert len(convert_kitti(labels, images, dontcare="drop")["annotations"]) == 2
    out = write_coco_json(data, tmp_path / "kitti.json")
    assert len(_read_back(out).getAnnIds(iscrowd=None)) == 3


def test_openimages_normalised_boxes_become_pixels(tmp_path):
    images = tmp_path / "validation"
    _img(images / "aaa.jpg", 200, 100)
    _img(images / "bbb.jpg", 50, 80)
    csv_path = tmp_path / "validation-annotations-bbox.csv"
    csv_path.write_text(
        "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n"
        "aaa,xclick,/m/01g317,1,0.1,0.6,0.2,0.9,0,0,0,0,0\n"
        "aaa,xclick,/m/0k4j,1,0.0,1.0,0.0,0.5,0,0,1,0,0\n"
        "bbb,xclick,/m/0k4j,1,0.5,1.0,0.25,0.75,1,0,0,0,0\n"
        "zzz,xclick,/m/0k4j,1,0.5,1.0,0.25,0.75,1,0,0,0,0\n")  # image not downloaded: skipped
    data = convert_openimages(csv_path, images)
    assert [i["file_name"] for i in data["images"]] == ["aaa.jpg", "bbb.jpg"]
    a0, group, b0 = data["annotations"]
    assert a0["bbox"] == pytest.approx([20.0, 20.0, 100.0, 70.0])
    assert group["iscrowd"] == 1 and group["bbox"] == pytest.approx([0.0, 0.0, 200.0, 50.0])
    assert b0["bbox"] == pytest.approx([25.0, 20.0, 25.0, 40.0]) and b0["image_id"] == 2
    sized = convert_openimages(csv_path, tmp_path / "nowhere", sizes={"aaa": (400, 200)})
    assert len(sized["images"]) == 1 and sized["annotations"][0]["bbox"] == pytest.approx([40.0, 40.0, 200.0, 140.0])
    out = write_coco_json(data, tmp_path / "oi.json")
    assert evaluate_coco(out, _gt_as_results(data), iou_types=["bbox"])["bbox"]["AP50"] == pytest.approx(100.0)


def test_coco_style_collapses_categories_keeps_masks_crowd_and_filters(tmp_path):
    src = {
        "images": [
            {"id": 10, "file_name": "images/v1/patch0/a.jpg", "height": 20, "width": 30,
             "coco_url": "http://images.cocodataset.org/val2017/000000000010.jpg"},
            {"id": 11, "file_name": "images/v1/patch1/b.jpg", "height": 20, "width": 30,
             "coco_url": "http://images.cocodataset.org/train2017/000000000011.jpg"},
            {"id": 12, "file_name": "c.jpg", "height": 20, "width": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 5, "bbox": [1, 1, 10, 10],
             "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 9, "bbox": [12, 2, 5, 5], "area": 25, "ignore": 1},
            {"id": 3, "image_id": 11, "category_id": 5, "bbox": [3, 3, 0, 4], "area": 0},  # empty: dropped
        ],
        "categories": [{"id": 5, "name": "person"}, {"id": 9, "name": "dog"}],
    }
    data = convert_coco_style(src)
    assert data["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    assert [a["id"] for a in data["annotations"]] == [1, 2]
    assert data["annotations"][0]["segmentation"] == [[1, 1, 11, 1, 11, 11, 1, 11]]
    assert [a["iscrowd"] for a in data["annotations"]] == [0, 1] and "ignore" not in data["annotations"][1]
    assert [i["id"] for i in data["images"]] == [10, 11, 12]  # images without boxes are kept by default
    assert [i["id"] for i in convert_coco_style(src, drop_empty_images=True)["images"]] == [10]
    lvis = convert_coco_style(src, file_names="coco_url")
    assert [i["file_name"] for i in lvis["images"][:2]] == ["val2017/000000000010.jpg", "train2017/000000000011.jpg"]
    flat = convert_coco_style(src, file_names="basename", image_list=["b.jpg", "c.jpg", "missing.jpg"])
    assert [i["file_name"] for i in flat["images"]] == ["b.jpg", "c.jpg"] and flat["annotations"] == []
    path = tmp_path / "in.json"
    path.write_text(json.dumps(src))
    out = write_coco_json(convert_coco_style(path), tmp_path / "agn.json")
    coco = _read_back(out)
    assert coco.annToMask(coco.anns[1]).sum() == 100  # the polygon survives as a usable mask
    m = evaluate_coco(out, [{"image_id": 10, "bbox": [1, 1, 10, 10], "score": 0.5,
                             "segmentation": src["annotations"][0]["segmentation"]}])
    assert m["bbox"]["AP"] == pytest.approx(100.0) and m["segm"]["AP"] == pytest.approx(100.0)
