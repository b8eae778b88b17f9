"""The MaskCut driver end to end on small images: COCO output read back by pycocotools, bad inputs,
sharding + merge, resume, CRF modes and post-processing."""
import io
import json
import os
import shutil
import struct
import sys
import types
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from cutler.config import MaskCutConfig
from cutler.maskcut import pipeline as pl
from cutler.maskcut.dataset import list_dataset, resolve_shard, select_job_folders, shard_records
from cutler.maskcut.postprocess import encode_mask, postprocess_image, resize_mask
from cutler.maskcut.writer import ShardWriter, chunk_files, merge_outputs

FAST = MaskCutConfig(vit_arch="small", patch_size=16, fixed_size=64, n=3, batch_size=3, num_workers=0,
                     crf_workers=-1, chunk_size=2, device="cpu")




@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        return pl.MaskCutModel(FAST)


def _scene(w, h, seed=0):
    """An RGB uint8 picture with two flat rectangles on a noisy background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    img[h // 5:h // 2, w // 6:w // 2] = (220, 40, 40)
    img[h // 2:4 * h // 5, w // 2:5 * w // 6] = (40, 200, 60)
    return img


def _png_with_huge_header(path, side=40000):
    """A PNG whose header declares side x side pixels (a decompression bomb), a few bytes on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A class-folder tree with good images and every kind of bad input."""
    root = tmp_path_factory.mktemp("ds")
    (root / "cls_a").mkdir()
    (root / "cls_b").mkdir()
    Image.fromarray(_scene(120, 80, 1)).save(root / "cls_a" / "wide.png")
    Image.fromarray(_scene(70, 100, 2)).save(root / "cls_a" / "tall.jpg", quality=95)
    Image.fromarray(_scene(96, 96, 3)).convert("L").save(root / "cls_a" / "gray.png")
    rgba = Image.fromarray(_scene(90, 60, 4)).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(root / "cls_b" / "rgba.png")
    Image.fromarray(_scene(80, 64, 5)).convert("CMYK").save(root / "cls_b" / "cmyk.jpg")
    deep = (np.asarray(Image.fromarray(_scene(72, 72, 6)).convert("L")).astype(np.uint16) * 257)
    Image.fromarray(deep).save(root / "cls_b" / "deep16.png")
    exif = Image.new("RGB", (100, 50))
    exif.paste(Image.fromarray(_scene(100, 50, 7)))
    ex = exif.getexif()
    ex[0x0112] = 6  # rotate 90 degrees: displayed as 50 wide x 100 high
    exif.save(root / "cls_b" / "exif_rot.jpg", exif=ex.tobytes())
    Image.fromarray(_scene(1500, 1100, 8)).save(root / "cls_b" / "big.jpg", quality=80)
    # bad ones
    buf = io.BytesIO()
    Image.fromarray(_scene(200, 150, 9)).save(buf, format="JPEG")
    (root / "cls_b" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "cls_b" / "corrupt.jpg").write_bytes(os.urandom(2000))
    (root / "cls_b" / "empty.png").write_bytes(b"")
    (root / "cls_b" / "notimage.png").write_text("this is a text file, not a picture\n")
    Image.fromarray(_scene(10, 12, 10)).save(root / "cls_b" / "tiny.png")
    _png_with_huge_header(root / "cls_b" / "huge_bomb.png")
    return root


GOOD = {"cls_a/wide.png": (120, 80), "cls_a/tall.jpg": (70, 100), "cls_a/gray.png": (96, 96),
        "cls_b/rgba.png": (90, 60), "cls_b/cmyk.jpg": (80, 64), "cls_b/deep16.png": (72, 72),
        "cls_b/exif_rot.jpg": (50, 100), "cls_b/big.jpg": (1500, 1100)}
BAD = {"cls_b/truncated.jpg": "truncated", "cls_b/corrupt.jpg": "not an image", "cls_b/empty.png": "empty",
       "cls_b/notimage.png": "not an image", "cls_b/tiny.png": "too small", "cls_b/huge_bomb.png": "too large"}


def test_end_to_end_bad_inputs_and_coco_output(tmp_path, dataset, model):
    records, root = list_dataset(str(dataset))
    assert [r.id for r in records] == list(range(1, len(records) + 1))
    out = tmp_path / "out"
    summary = pl.run_maskcut(FAST, records, str(out), progress=False, model=model)
    assert summary["processed"] == len(GOOD) and summary["failed"] == len(BAD)
    assert sum(summary["failures_by_reason"].values()) == len(BAD)
    merged = out / "merged.json"
    counts = merge_outputs(str(out), str(merged))
    coco = COCO(str(merged))
    assert coco.dataset["categories"] == [{"id": 1, "name": "fg", "supercategory": "fg"}]
    by_name = {im["file_name"]: im for im in coco.dataset["images"]}
    assert set(by_name) == set(GOOD)
    for name, (w, h) in GOOD.items():  # width/height NOT swapped, EXIF orientation applied
        assert (by_name[name]["width"], by_name[name]["height"]) == (w, h), name
    ids = {r.file_name: r.id for r in records}
    assert all(by_name[n]["id"] == ids[n] for n in GOOD)
    anns = coco.dataset["annotations"]
    assert anns, "random weights on these scenes still give masks; none means the pipeline dropped them"
    assert counts["annotations"] == len(anns) == summary["annotations"]
    assert len({a["id"] for a in anns}) == len(anns)
    for a in anns:
        im = coco.imgs[a["image_id"]]
        assert isinstance(a["segmentation"]["counts"], str)
        m = coco.annToMask(a)
        assert m.shape == (im["height"], im["width"]) and m.sum() == a["area"] >= 1
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    fails = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert {f["file_name"]: f for f in fails}.keys() == BAD.keys()
    for f in fails:
        assert BAD[f["file_name"]] in f["reason"], f


def test_resume_and_shards_merge_without_duplicates_or_gaps(tmp_path, dataset, model):
    records, _ = list_dataset(str(dataset))
    good = [r for r in records if r.file_name in GOOD]
    single = tmp_path / "single"
    pl.run_maskcut(FAST, good, str(single), progress=False, model=model)
    merge_outputs(str(single), str(single / "all.json"))
    ref = json.loads((single / "all.json").read_text())

    sharded = tmp_path / "sharded"
    for k in range(3):
        pl.run_maskcut(FAST, shard_records(good, k, 3), str(sharded), k, 3, progress=False, model=model)
    # crash simulation: one shard lost its last chunk; a rerun redoes exactly those images
    shard1 = sorted((sharded / "shards").iterdir())[1]
    os.remove(chunk_files(shard1)[-1])
    again = pl.run_maskcut(FAST, shard_records(good, 1, 3), str(sharded), 1, 3, progress=False, model=model)
    assert again["skipped_already_done"] == 2 and again["processed"] == 1
    rerun = pl.run_maskcut(FAST, shard_records(good, 1, 3), str(sharded), 1, 3, progress=False, model=model)
    assert rerun["processed"] == 0 and rerun["skipped_already_done"] == 3
    from cutler.maskcut.cli import merge_main

    counts = merge_main(["--out-dir", str(sharded), "--save-path", str(sharded / "all.json")])  # merge_jsons.py
    got = json.loads((sharded / "all.json").read_text())
    assert counts["duplicates"] == 0
    assert sorted((i["id"], i["file_name"]) for i in got["images"]) == sorted((i["id"], i["file_name"]) for i in ref["images"])
    assert [a["id"] for a in got["annotations"]] == list(range(1, len(got["annotations"]) + 1))

    def key(d):
        return sorted((a["image_id"], a["segmentation"]["counts"]) for a in d["annotations"])
    assert ref["annotations"] and key(got) == key(ref)  # batching and sharding do not change any mask


def test_shard_helpers(monkeypatch, dataset):
    records, _ = list_dataset(str(dataset))
    parts = [shard_records(records, k, 4) for k in range(4)]
    assert sorted(r.id for p in parts for r in p) == [r.id for r in records]
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "5")
    assert resolve_shard() == (2, 5) and resolve_shard(1, 3) == (1, 3)
    job = select_job_folders(records, 1, 1)
    assert job and all(r.file_name.startswith("cls_b/") for r in job)


def test_coco_json_input(tmp_path, dataset):
    images = [{"id": 100 + i, "file_name": n, "width": 0, "height": 0} for i, n in enumerate(sorted(GOOD))]
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps({"images": images}))
    records, root = list_dataset(str(listing), str(dataset))
    assert [r.id for r in records] == [100 + i for i in range(len(GOOD))]
    assert os.path.isfile(records[0].path) and root == str(dataset)


def test_postprocess_crf_fill_reject_and_encode():
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = 255
    good = np.zeros((64, 64), bool)
    good[18:46, 14:48] = True  # roughly the bright square
    wrong = np.zeros((64, 64), bool)
    wrong[0:6, 0:6] = True  # a corner of flat background: the CRF wipes it out -> rejected
    anns, t = postprocess_image(img, np.stack([good, wrong, np.zeros_like(good)]), 128, 96)
    assert len(anns) == 1 and anns[0]["stage"] == 0 and t["crf"] > 0
    m = mask_util.decode(anns[0]["segmentation"])
    assert m.shape == (96, 128)
    sq = np.zeros((96, 128), bool)
    sq[24:72, 32:96] = True
    assert (m.astype(bool) & sq).sum() / (m.astype(bool) | sq).sum() > 0.9
    none, _ = postprocess_image(img, np.stack([wrong]), 64, 64, crf="none")
    assert len(none) == 1 and none[0]["area"] == 36
    assert encode_mask(np.zeros((5, 5), bool)) is None
    r = resize_mask(np.eye(4, dtype=bool).repeat(4, 0).repeat(4, 1), 32, 32)
    assert r.shape == (32, 32) and r[0, 0] and not r[0, 31]


def test_crf_modes_and_torch_crf_plugin(monkeypatch, tmp_path, dataset, model):
    assert pl.resolve_crf_mode("auto", torch.device("cpu")) == "pydensecrf"
    with pytest.raises(ValueError):
        pl.resolve_crf_mode("bogus", torch.device("cpu"))
    calls = []

    def fake_refine(images, masks, params=None, image_index=None):
        calls.append((tuple(images.shape), tuple(masks.shape)))
        assert images.dtype == torch.uint8 and masks.dtype == torch.float32
        # each distinct image is sent once; image_index maps every mask to its image
        assert image_index.shape == (masks.shape[0],) and int(image_index.max()) == images.shape[0] - 1
        assert images.shape[0] == 1 or (images[1:] != images[:-1]).flatten(1).any(1).all()
        up = torch.nn.functional.interpolate(masks[:, None], size=images.shape[1:3], mode="nearest")[:, 0]
        return up > 0.5  # identity "CRF": the output equals the input mask

    fake = types.ModuleType("cutler.maskcut.torch_crf")
    fake.torch_crf_refine = fake_refine
    monkeypatch.setitem(sys.modules, "cutler.maskcut.torch_crf", fake)
    assert pl.resolve_crf_mode("torch", torch.device("cpu")) == "torch"
    records, _ = list_dataset(str(dataset))
    good = [r for r in records if r.file_name in ("cls_a/wide.png", "cls_a/gray.png")]
    cfg_t = replace(FAST, crf="torch")
    s_t = pl.run_maskcut(cfg_t, good, str(tmp_path / "t"), progress=False, model=model)
    s_n = pl.run_maskcut(replace(FAST, crf="none"), good, str(tmp_path / "n"), progress=False, model=model)
    assert calls and calls[0][0][1:] == (64, 64, 3)
    assert s_t["crf"] == "torch" and s_t["annotations"] == s_n["annotations"] > 0
    merge_outputs(str(tmp_path / "t"), str(tmp_path / "t.json"))
    merge_outputs(str(tmp_path / "n"), str(tmp_path / "n.json"))
    rle = [[a["segmentation"]["counts"] for a in json.loads((tmp_path / f"{k}.json").read_text())["annotations"]]
           for k in "tn"]
    assert rle[0] == rle[1]  # identity CRF + hole filling of solid masks == no CRF


def test_process_pool_matches_inline(tmp_path, dataset, model):
    records, _ = list_dataset(str(dataset))
    good = [r for r in records if r.file_name in ("cls_a/wide.png", "cls_b/rgba.png", "cls_a/tall.jpg")]
    pl.run_maskcut(FAST, good, str(tmp_path / "inline"), progress=False, model=model)
    pl.run_maskcut(replace(FAST, crf_workers=1, num_workers=1), good, str(tmp_path / "pool"), progress=False,
                   model=model)
    out = []
    for k in ("inline", "pool"):
        merge_outputs(str(tmp_path / k), str(tmp_path / f"{k}.json"))
        out.append(sorted((a["image_id"], a["segmentation"]["counts"])
                          for a in json.loads((tmp_path / f"{k}.json").read_text())["annotations"]))
    assert out[0] == out[1]


def test_writer_torn_failure_line_and_chunk_numbering(tmp_path):
    w = ShardWriter(tmp_path / "s", chunk_size=2)
    for i in range(3):
        w.add(i + 1, f"img{i}.png", 10, 20, [{"segmentation": {}, "area": 1.0, "bbox": [0, 0, 1, 1]}])
    w.add_failure(9, "bad.png", "empty file")
    w.close()
    with open(tmp_path / "s" / "failures.jsonl", "a") as f:
        f.write('{"id": 10, "file_na')  # torn by a crash
    w2 = ShardWriter(tmp_path / "s", chunk_size=2)
    assert all(w2.is_done(n) for n in ("img0.png", "img1.png", "img2.png", "bad.png"))
    assert w2.next_chunk == 2 and not w2.is_done("img3.png")
    w2.close()


def test_cli_published_flags_and_overrides(tmp_path, dataset):
    from cutler.maskcut.cli import args_to_overrides, build_parser, main

    args = build_parser().parse_args(["--dataset-path", "x", "--vit-arch", "small", "--N", "2", "--tau", "0.2",
                                      "--cpu", "--fixed_size", "64", "maskcut.chunk_size=5"])
    ov = args_to_overrides(args)
    assert 'maskcut.dataset_path="x"' in ov and "maskcut.n=2" in ov and "maskcut.device=cpu" in ov
    sub = tmp_path / "flat"
    sub.mkdir()
    for n in ("cls_a/wide.png", "cls_b/rgba.png"):
        shutil.copy(dataset / n, sub / Path(n).name)
    (sub / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "cli"
    summary = main(["--dataset-path", str(sub), "--out-dir", str(out), "--vit-arch", "small", "--patch-size", "16",
                    "--fixed_size", "64", "--N", "2", "--cpu", "--num-workers", "0", "--no-progress",
                    "maskcut.crf_workers=-1"])
    assert summary["processed"] == 2 and summary["failed"] == 1
    coco = COCO(summary["output_json"])
    assert Path(summary["output_json"]).name == "flat_fixsize64_tau0.15_N2.json"
    assert sorted(im["file_name"] for im in coco.dataset["images"]) == ["rgba.png", "wide.png"]
    # random weights are seeded: a rerun into another folder writes the same masks
    again = main(["--dataset-path", str(sub), "--out-dir", str(tmp_path / "cli2"), "--vit-arch", "small",
                  "--patch-size", "16", "--fixed_size", "64", "--N", "2", "--cpu", "--num-workers", "0",
                  "--no-progress", "--threads", "1", "maskcut.crf_workers=-1"])
    a1, a2 = (json.loads(Path(s["output_json"]).read_text())["annotations"] for s in (summary, again))
    assert a1 == a2


def test_demo_writes_overlay_with_eigvec_panels(tmp_path, dataset):
    from cutler.maskcut.demo import main as demo_main

    out = tmp_path / "demo.png"
    torch.manual_seed(0)
    pic, anns = demo_main(["--img-path", str(dataset / "cls_a" / "wide.png"), "--output", str(out), "--vit-arch",
                           "small", "--patch-size", "16", "--fixed_size", "64", "--N", "2", "--cpu",
                           "--show-eigvecs"])
    saved = np.asarray(Image.open(out).convert("RGB"))
    assert saved.shape == pic.shape and saved.shape[0] == 80
    assert saved.shape[1] == 120 + 2 * 80  # the picture, then one square eigenvector panel per stage
    src = np.asarray(Image.open(dataset / "cls_a" / "wide.png").convert("RGB"))
    assert (saved[:, :120] != src).any() == bool(anns)  # masks drawn iff any survived


def test_real_torch_crf_close_to_pydensecrf(tmp_path, dataset, model):
    """Integration with the real torch CRF."""
    records, _ = list_dataset(str(dataset))
    good = [r for r in records if r.file_name in ("cls_a/wide.png", "cls_b/rgba.png")]
    out = {}
    for mode in ("torch", "pydensecrf"):
        pl.run_maskcut(replace(FAST, crf=mode), good, str(tmp_path / mode), progress=False, model=model)
        merge_outputs(str(tmp_path / mode), str(tmp_path / f"{mode}.json"))
        out[mode] = {(a["image_id"], a["stage"]): mask_util.decode(a["segmentation"]).astype(bool)
                     for a in json.loads((tmp_path / f"{mode}.json").read_text())["annotations"]}
    assert out["pydensecrf"], "expected at least one kept mask"
    common = set(out["torch"]) & set(out["pydensecrf"])
    assert len(common) >= len(out["pydensecrf"]) - 1
    for k in common:
        a, b = out["torch"][k], out["pydensecrf"][k]
        assert (a & b).sum() / (a | b).sum() > 0.9


def test_cli_torchrun_env_shards_then_merge(tmp_path, dataset, monkeypatch):
    from cutler.maskcut.cli import main, merge_main

    sub = tmp_path / "imgs"
    sub.mkdir()
    for n in ("cls_a/wide.png", "cls_b/rgba.png", "cls_a/gray.png"):
        shutil.copy(dataset / n, sub / Path(n).name)
    out = tmp_path / "out"
    common = ["--dataset-path", str(sub), "--out-dir", str(out), "--vit-arch", "small", "--patch-size", "16",
              "--fixed_size", "64", "--N", "2", "--cpu", "--num-workers", "0", "--no-progress", "maskcut.crf_workers=-1"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        s = main(common)
        assert s["shard_index"] == rank and s["num_shards"] == 2 and "output_json" not in s
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000-of-00002", "shard-00001-of-00002"]
    counts = merge_main(["--out-dir", str(out)])
    merged = COCO(str(out / "merged.json"))
    assert counts["images"] == 3 and sorted(merged.getImgIds()) == [1, 2, 3]  # ids = sorted-list index + 1


def test_bench_maskcut_reports_torch_crf_row_and_final_mask_agreement(tmp_path):
    """The end-to-end benchmark runs once per CRF mode and compares the final COCO masks of each mode with
    pydensecrf's per (image, stage)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_maskcut", Path(__file__).resolve().parents[1] / "scripts" / "bench_maskcut.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    # the agreement figure on hand-made outputs: identical, shifted, and kept by one side only
    def rle(box):
        m = np.zeros((20, 20), np.uint8)
        m[box[1]:box[3], box[0]:box[2]] = 1
        r = mask_util.encode(np.asfortranarray(m))
        r["counts"] = r["counts"].decode()
        return r
    ref = {"annotations": [{"image_id": 1, "stage": 0, "segmentation": rle((0, 0, 10, 10))},
                           {"image_id": 1, "stage": 1, "segmentation": rle((10, 10, 20, 20))}]}
    other = {"annotations": [{"image_id": 1, "stage": 0, "segmentation": rle((0, 0, 10, 10))},
                             {"image_id": 1, "stage": 1, "segmentation": rle((10, 10, 20, 15))},
                             {"image_id": 2, "stage": 0, "segmentation": rle((0, 0, 5, 5))}]}
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    (tmp_path / "other.json").write_text(json.dumps(other))
    agree = bench.final_mask_agreement(str(tmp_path / "ref.json"), str(tmp_path / "other.json"))
    assert agree["pairs"] == 3 and agree["kept_by_one_only"] == 1
    assert agree["mean_iou"] == pytest.approx((1.0 + 0.5 + 0.0) / 3) and agree["worst_iou"] == 0.0

    res = bench.main(["--num-images", "2", "--vit-arch", "small", "--patch-size", "16", "--fixed-size", "128",
                      "--batch-size", "2", "--num-workers", "0", "--crf-workers", "-1", "--device", "cpu",
                      "--crf", "pydensecrf", "torch", "--skip-published", "--vit-dtype", "bfloat16",
                      "--dtype-agreement", "--compat-agreement"])
    rows = res["ours_end_to_end_by_crf"]
    assert set(rows) == {"pydensecrf", "torch"} and res["ours_end_to_end"] == rows["pydensecrf"]
    assert all(r["masks"] > 0 and r["crf_masks_per_crf_s"] > 0 for r in rows.values())
    torch_vs_ref = res["final_masks_vs_pydensecrf"]["torch"]
    assert torch_vs_ref["masks_ref"] == rows["pydensecrf"]["masks"]
    assert torch_vs_ref["mean_iou"] >= 0.98
    dt = res["agreement_vit_dtype_vs_float32"]
    assert dt["vit_dtype"] == "bfloat16" and len(dt["mean_stage_iou"]) == 3
    assert 0 < dt["feature_max_rel_diff"] < 0.05 and 0 <= dt["affinity_entries_flipped"] < 0.05
    compat = res["default_vs_published_compat"]
    for key in ("identical_features", "each_mode_own_vit"):
        d = compat[key]
        assert (d["of_images"], d["of_stages"]) == (2, 6) and d["images"] <= d["stages"] == len(d["pairs"])
    events = compat["solved_stages_with_event"]
    assert 2 <= events["solved_stages"] <= 6 and set(events) == {"solved_stages", "sign", "mean_tie", "seed_tie",
                                                                 "degenerate"}
    assert sum(compat["first_difference_caused_by"].values()) == compat["identical_features"]["images"]
    assert 0 < compat["vit_dino_vs_fused_max_abs_diff"] < 0.1  # the bf16 default forward vs DINO's float32 one


def test_masks_are_upsampled_to_the_fixed_size_image(tmp_path, dataset, model):
    """fixed_size 88 with patch 16: the ViT sees 96 px (a patch multiple), but the stage masks are upsampled from
    the patch grid straight to the 88 px image the CRF and the output use, as the spec says."""
    from cutler.maskcut.dataset import resize_for_maskcut
    from cutler.maskcut.ncut import upsample_stage_masks
    from cutler.utils.image import read_image_rgb

    cfg = replace(FAST, fixed_size=88, crf="none")
    rec = [r for r in list_dataset(str(dataset))[0] if r.file_name == "cls_a/wide.png"]
    pl.run_maskcut(cfg, rec, str(tmp_path / "o"), progress=False, model=model)
    merge_outputs(str(tmp_path / "o"), str(tmp_path / "o.json"))
    got = {a["stage"]: a["segmentation"]["counts"] for a in json.loads((tmp_path / "o.json").read_text())["annotations"]}
    image = read_image_rgb(rec[0].path)
    fixed, resized = resize_for_maskcut(image, 88, 16)
    assert fixed.shape[:2] == (88, 88) and resized.shape[:2] == (96, 96)
    patch = model.patch_masks([resized]).masks
    up = upsample_stage_masks(patch, (88, 88))[0].cpu().numpy()
    want = {k: encode_mask(resize_mask(m, image.shape[1], image.shape[0]))["segmentation"]["counts"]
            for k, m in enumerate(up) if m.any()}
    assert got and got == want


class _OneBadImageModel:
    """Stand-in for MaskCutModel: one 4x4 stage mask per image; a batch holding a white image raises."""

    device = torch.device("cpu")

    def __init__(self):
        self.timings = {"decode": 0.0, "decode_wait": 0.0}
        self.calls = []

    def image_masks(self, resized, out_hw=None):
        self.calls.append(len(resized))
        if any(r[0, 0, 0] == 255 for r in resized):
            raise RuntimeError("broken image")
        masks = np.zeros((len(resized), 1, *out_hw), dtype=bool)
        masks[:, :, 2:6, 2:6] = True
        return types.SimpleNamespace(status=torch.zeros((len(resized), 1), dtype=torch.long)), masks


def _item(i, name, bright=False):
    img = np.full((8, 8, 3), 255 if bright else 10, dtype=np.uint8)
    return {"record": pl.ImageRecord(i, name, name), "width": 8, "height": 8, "image": img, "resized": img,
            "decode_s": 0.0}


def test_shard_runner_isolates_the_image_that_breaks_a_batch_and_keeps_order(tmp_path):
    writer = ShardWriter(tmp_path / "s", chunk_size=10)
    bar = types.SimpleNamespace(update=lambda n: None)
    progress = pl.ShardProgress(writer, bar)
    model = _OneBadImageModel()
    queue = pl.PostprocessQueue(None, progress, model.timings | {"crf": 0.0, "encode": 0.0}, max_pending=1)
    runner = pl.ShardRunner(replace(FAST, crf="none"), model, "none", queue, progress)
    batches = [[_item(1, "a.png"), _item(2, "bad.png", bright=True), _item(3, "c.png")],
               [{"record": pl.ImageRecord(4, "d.png", "d.png"), "error": "not an image"}, _item(5, "e.png")]]
    runner.run(batches)
    writer.close()
    assert model.calls == [3, 1, 1, 1, 1]  # the broken batch is retried image by image
    chunk = json.loads(Path(chunk_files(tmp_path / "s")[0]).read_text())
    assert [im["file_name"] for im in chunk["images"]] == ["a.png", "c.png", "e.png"]
    assert all(a["area"] == 16 for a in chunk["annotations"]) and len(chunk["annotations"]) == 3
    lines = (tmp_path / "s" / "failures.jsonl").read_text().splitlines()
    fails = {f["file_name"]: f["reason"] for f in map(json.loads, lines)}
    assert fails == {"bad.png": "maskcut failed: RuntimeError: broken image", "d.png": "not an image"}
    assert progress.reasons == {"maskcut failed": 1, "not an image": 1}
    assert runner.stage_status == {"kept": 3}


def test_postprocess_queue_records_a_failing_image_and_writes_the_others(tmp_path):
    writer = ShardWriter(tmp_path / "s", chunk_size=10)
    progress = pl.ShardProgress(writer, types.SimpleNamespace(update=lambda n: None))
    queue = pl.PostprocessQueue(None, progress, {"crf": 0.0, "encode": 0.0}, max_pending=5)
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 1:3, 1:4] = True
    for i, name in enumerate(("a.png", "b.png")):
        queue.submit(_item(i, name), (_item(i, name)["image"], masks, 8, 8, "none", None, 0.5, pl.CRFParams()))
    queue.submit(_item(2, "c.png"), (None, masks, 8, 8, "pydensecrf", None, 0.5, pl.CRFParams()))  # no image: raises
    queue.drain()
    assert len(queue.pending) == 3  # under max_pending nothing is collected yet
    queue.drain(0)
    writer.close()
    chunk = json.loads(Path(chunk_files(tmp_path / "s")[0]).read_text())
    assert [im["file_name"] for im in chunk["images"]] == ["a.png", "b.png"] and chunk["annotations"][0]["area"] == 6
    fail = json.loads((tmp_path / "s" / "failures.jsonl").read_text())
    assert fail["file_name"] == "c.png" and fail["reason"].startswith("post-processing failed: ")
