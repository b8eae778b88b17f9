"""Self-training label merge on hand-made cases."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO

from cutler.selftrain.merge import merge_self_training_labels, select_labels

H, W = 20, 30


def rle(y0, y1, x0, x1):
    m = np.zeros((H, W), np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    r = mask_utils.encode(m)
    r["counts"] = r["counts"].decode()
    return r


def enc(r):
    return {"size": r["size"], "counts": r["counts"].encode()}


def test_select_labels_rule():
    prev = [enc(rle(0, 10, 0, 10)), enc(rle(0, 10, 20, 30)), enc(rle(12, 20, 0, 5))]
    # pred 0 overlaps prev 0 with IoU 80/100+... ; pred 1 scores too low; pred 2 overlaps prev 1 at IoU 0.5 exactly.
    preds = [enc(rle(0, 10, 0, 8)), enc(rle(12, 20, 0, 5)), enc(rle(0, 10, 25, 30))]
    kept_pred, kept_prev = select_labels(prev, preds, [0.9, 0.5, 0.8], score_thresh=0.7, drop_iou_thresh=0.5)
    assert kept_pred == [0, 2]
    # prev 0: IoU 0.8 > 0.5 -> dropped; prev 1: IoU 50/100 = 0.5, not > 0.5 -> kept; prev 2: only the
    # low-score prediction matches it -> kept.
    assert kept_prev == [1, 2]
    assert select_labels(prev, preds, [0.1, 0.1, 0.1], 0.7) == ([], [0, 1, 2])
    assert select_labels([], preds, [0.9, 0.9, 0.1], 0.7) == ([0, 1], [])


def _write(tmp_path):
    prev = {"images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W},
                       {"id": 2, "file_name": "b.jpg", "height": H, "width": W},
                       {"id": 3, "file_name": "c.jpg", "height": H, "width": W}],
            "annotations": [
                {"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle(0, 10, 0, 10)},
                {"id": 8, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle(15, 20, 20, 30)},
                {"id": 9, "image_id": 2, "category_id": 1, "iscrowd": 0,
                 "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},  # polygon input
            ],
            "categories": [{"id": 1, "name": "fg"}]}
    preds = [{"image_id": 1, "category_id": 1, "score": 0.95, "segmentation": rle(0, 10, 1, 10)},
             {"image_id": 1, "category_id": 1, "score": 0.3, "segmentation": rle(15, 20, 20, 30)},
             {"image_id": 2, "category_id": 1, "score": 0.2, "segmentation": rle(0, 5, 0, 5)},
             {"image_id": 3, "category_id": 1, "score": 0.8, "segmentation": rle(5, 15, 5, 15)}]
    (tmp_path / "prev.json").write_text(json.dumps(prev))
    chunks = tmp_path / "preds"
    chunks.mkdir()
    (chunks / "chunk-000.json").write_text(json.dumps(preds[:2]))
    (chunks / "chunk-001.json").write_text(json.dumps(preds[2:]))
    return tmp_path / "prev.json", chunks


def test_merge_file_is_valid_coco_with_renumbered_ids(tmp_path):
    prev, chunks = _write(tmp_path)
    out = tmp_path / "r1.json"
    stats = merge_self_training_labels(prev, chunks, out, score_thresh=0.7)
    coco = COCO(str(out))
    anns = coco.dataset["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3, 4]
    per_image = {i: len(coco.getAnnIds(imgIds=i)) for i in (1, 2, 3)}
    # image 1: kept prediction replaces prev 7 (IoU 0.9), prev 8 survives; image 2: no kept prediction,
    # keeps its polygon label; image 3: had none, gains the prediction.
    assert per_image == {1: 2, 2: 1, 3: 1}
    for a in anns:
        m = coco.annToMask(a)
        assert a["area"] == m.sum()
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert stats.kept_predictions == 2 and stats.dropped_previous == 1 and stats.kept_previous == 2
    assert stats.annotations == 4 and stats.images_with_new_labels == 2


def test_cli_and_errors(tmp_path):
    prev, chunks = _write(tmp_path)
    out = tmp_path / "cli.json"
    tool = Path(__file__).resolve().parents[1] / "tools" / "get_self_training_ann.py"
    res = subprocess.run([sys.executable, str(tool), "--new-pred", str(chunks), "--prev-ann", str(prev),
                          "--save-path", str(out), "--threshold", "0.9"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["kept_predictions"] == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.json").write_text(json.dumps([{"image_id": 99, "score": 0.9, "segmentation": rle(0, 1, 0, 1)}]))
    with pytest.raises(ValueError, match="image id 99"):
        merge_self_training_labels(prev, bad, tmp_path / "o.json")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="no images"):
        merge_self_training_labels(empty, chunks, tmp_path / "o.json")


class _OneMaskModel:
    """A stand-in detector: one confident 5x5 mask per image at the top-left corner."""

    def __call__(self, batch):
        import torch

        out = []
        for b in batch:
            m = torch.zeros(1, b["height"], b["width"], dtype=torch.bool)
            m[0, :5, :5] = True
            out.append({"instances": {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "scores": torch.tensor([0.9]),
                                      "masks": m}})
        return out


def test_merge_reads_an_inference_output_folder_once(tmp_path):
    """The inference output folder holds the merged results, failures.json and the chunks: each prediction
    must be read exactly once whichever of them is given, and a killed run's uncommitted chunk is ignored."""
    from PIL import Image

    from cutler.evaluation.inference import run_inference
    from cutler.selftrain.merge import iter_predictions

    root = tmp_path / "imgs"
    root.mkdir()
    images = []
    for i in range(3):
        Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": H, "width": W})
    (root / "bad.png").write_bytes(b"not an image")
    images.append({"id": 9, "file_name": "bad.png", "height": H, "width": W})
    out = tmp_path / "pred"
    results = run_inference(_OneMaskModel(), images, root, out, min_size=H, max_size=1000, chunk_size=2,
                            progress=False)
    assert results is not None and json.loads((out / "failures.json").read_text())  # one unreadable image
    # a killed run left a results file without its .done marker: not committed, must not count
    (out / "chunks" / "r0_000099.results.json").write_text(json.dumps([{"image_id": 1, "score": 0.99,
                                                                          "segmentation": rle(0, 20, 0, 30)}]))
    for source in (results, out, out / "chunks"):
        preds = [p for block in iter_predictions(source) for p in block]
        assert sorted(p["image_id"] for p in preds) == [1, 2, 3], source
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "fg"}]}))
    stats = merge_self_training_labels(prev, out, tmp_path / "next.json", score_thresh=0.7)
    assert stats.kept_predictions == stats.annotations == 3
    anns = COCO(str(tmp_path / "next.json")).dataset["annotations"]
    assert sorted(a["image_id"] for a in anns) == [1, 2, 3] and all(a["area"] == 25 for a in anns)


def test_large_results_list_is_streamed_in_blocks(tmp_path, monkeypatch):
    """A results .json list is read element by element (bounded blocks), not json.load-ed whole."""
    import cutler.utils.io as io_mod
    from cutler.selftrain.merge import iter_predictions

    preds = [{"image_id": 1 + i % 3, "score": 0.5 + (i % 5) / 10, "segmentation": rle(i % 10, 20, 0, 30)}
             for i in range(25)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(preds))
    real = io_mod.iter_json_array
    monkeypatch.setattr(io_mod, "iter_json_array", lambda p: real(p, block_size=10, read_bytes=100))
    blocks = list(iter_predictions(path))
    assert [len(b) for b in blocks] == [10, 10, 5] and [p for b in blocks for p in b] == preds
