"""U2Seg instance embeddings: crops and features against references, rank sharding, resume after a kill,
bad images recorded, settings checked, and the cluster-labelled COCO file pycocotools reads back."""
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import transforms

from cutler.config import load_config
from cutler.maskcut.dataset import resize_for_maskcut
from cutler.u2seg.embeddings import (InstanceEmbedder, box_crop, embed_instances, iter_failures, load_embeddings,
                                     load_instance_set, patch_weights)
from cutler.u2seg.labels import assign_embeddings, cluster_embeddings, write_cluster_labels
from cutler.utils.image import read_image_rgb

SMALL = ["u2seg.vit_arch=small", "u2seg.patch_size=16", "u2seg.crop_size=32", "u2seg.image_size=64",
         "u2seg.batch_size=8", "u2seg.num_workers=0", "u2seg.num_clusters=4", "u2seg.backend=torch"]


def _cfg(*extra):
    return load_config(None, SMALL + list(extra)).u2seg


@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return InstanceEmbedder("cls", "small", 16, "", "float32", "cpu", 8)


@pytest.fixture()
def shapes(synthetic_root, tmp_path):
    """A private copy of the synthetic train split (tests may damage images) and its class-aware labels."""
    src = synthetic_root / "synthetic" / "train"
    shutil.copytree(src, tmp_path / "train")
    return tmp_path / "train" / "annotations_shapes.json", tmp_path / "train" / "images"


def test_box_crop_is_torchvision_resize_then_center_crop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    for bbox in ([10.2, 5.0, 60.0, 20.5], [0, 0, 120, 90], [100.7, 80.1, 0.2, 0.3], [30, 10, 8, 70]):
        x0, y0 = int(np.floor(bbox[0])), int(np.floor(bbox[1]))
        x1 = max(int(np.ceil(bbox[0] + bbox[2])), x0 + 1)
        y1 = max(int(np.ceil(bbox[1] + bbox[3])), y0 + 1)
        ref = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32)])(
            Image.fromarray(image).crop((x0, y0, min(x1, 120), min(y1, 90))))
        assert np.array_equal(box_crop(image, bbox, 32), np.asarray(ref).transpose(2, 0, 1)), bbox


def test_cls_feature_is_the_vit_forward(embedder):
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    vit = embedder.vit
    reference = vit.vit((x.float() / 255 - vit.mean) / vit.std)  # timm: final norm, CLS token, no head
    torch.testing.assert_close(vit.cls_features(x), reference, rtol=1e-4, atol=1e-4)


def test_sharded_resumed_and_bad_images(shapes, tmp_path, embedder, monkeypatch):
    ann_file, images = shapes
    cfg = _cfg("u2seg.chunk_size=2")
    instances = load_instance_set(ann_file)
    whole = embed_instances(instances, images, tmp_path / "whole", cfg, progress=False, embedder=embedder)
    assert whole["complete"] and whole["instances"] == instances.num_instances
    ids, image_ids, feats = load_embeddings(tmp_path / "whole")
    gt = json.loads(ann_file.read_text())
    assert ids.tolist() == sorted(a["id"] for a in gt["annotations"])
    assert image_ids.tolist() == [next(a["image_id"] for a in gt["annotations"] if a["id"] == i) for i in ids]
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)

    # Two ranks, and rank 1 killed after its first chunk, then rerun: the same arrays.
    first = embed_instances(instances, images, tmp_path / "ranks", cfg, 0, 2, progress=False, embedder=embedder)
    assert not first["complete"] and not (tmp_path / "ranks" / "features.npy").exists()
    calls = {"n": 0}
    real = embedder.embed

    def dying(items):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt("killed")
        return real(items)

    monkeypatch.setattr(embedder, "embed", dying)
    with pytest.raises(KeyboardInterrupt):
        embed_instances(instances, images, tmp_path / "ranks", cfg, 1, 2, progress=False, embedder=embedder)
    monkeypatch.setattr(embedder, "embed", real)
    again = embed_instances(instances, images, tmp_path / "ranks", cfg, 1, 2, progress=False, embedder=embedder)
    assert again["complete"] and again["skipped_already_done"] == 2  # one chunk of 2 images survived the kill
    ids2, _, feats2 = load_embeddings(tmp_path / "ranks")
    assert np.array_equal(ids2, ids)
    np.testing.assert_allclose(feats2, feats, atol=1e-5)

    # A corrupt image is recorded with its reason; its instances have no embedding; the rest go on.
    bad = next(im for im in gt["images"] if any(a["image_id"] == im["id"] for a in gt["annotations"]))
    (images / bad["file_name"]).write_bytes(b"not a png")
    run = embed_instances(instances, images, tmp_path / "bad", cfg, progress=False, embedder=embedder)
    assert run["complete"] and run["failed"] == 1
    assert [f["id"] for f in iter_failures(tmp_path / "bad")] == [bad["id"]]
    ids3, _, _ = load_embeddings(tmp_path / "bad")
    lost = {a["id"] for a in gt["annotations"] if a["image_id"] == bad["id"]}
    assert set(ids3.tolist()) == set(ids.tolist()) - lost

    # ... and the cluster-labelled file leaves them out; pycocotools reads it back.
    result = cluster_embeddings(tmp_path / "bad", tmp_path / "clusters", cfg)
    stats = write_cluster_labels(ann_file, ids3, result.labels, 4, tmp_path / "labels.json")
    assert stats == {"instances": len(ids3), "without_embedding": len(lost), "below_score": 0}
    coco = COCO(str(tmp_path / "labels.json"))
    assert coco.getCatIds() == [1, 2, 3, 4] and [c["name"] for c in coco.loadCats([1, 4])] == ["1", "4"]
    by_id = {a["id"]: a for a in coco.dataset["annotations"]}
    assert [by_id[i]["category_id"] - 1 for i in ids3] == result.labels.tolist()
    assert by_id[int(ids3[0])]["segmentation"] == next(a for a in gt["annotations"] if a["id"] == ids3[0])["segmentation"]
    # New instances (here: the same ones again) go to their nearest saved centroid.
    new_ids, labels = assign_embeddings(tmp_path / "bad", tmp_path / "clusters")
    assert np.array_equal(new_ids, ids3) and np.array_equal(labels, result.labels)

    # Other settings in the same folder are refused, naming the change.
    with pytest.raises(ValueError, match="crop_size: 32 -> 48"):
        embed_instances(instances, images, tmp_path / "whole", _cfg("u2seg.crop_size=48"), progress=False,
                        embedder=embedder)


def test_masked_mean_of_patch_keys(shapes, tmp_path):
    ann_file, images = shapes
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        keys_embedder = InstanceEmbedder("keys", "small", 16, "", "float32", "cpu", 4)
    instances = load_instance_set(ann_file)
    image = next(im for im in instances.images if len(instances.instances.get(im["id"], [])) >= 2)
    one = type(instances)([image], instances.instances)
    embed_instances(one, images, tmp_path / "keys", _cfg("u2seg.feature=keys"), progress=False, embedder=keys_embedder)
    ids, _, feats = load_embeddings(tmp_path / "keys")
    rgb = read_image_rgb(images / image["file_name"])
    _, resized = resize_for_maskcut(rgb, 64, 16)
    keys = keys_embedder.vit(torch.from_numpy(resized.transpose(2, 0, 1)[None].copy()))[0].numpy()  # (16, 384)
    for row, inst in zip(feats, instances.instances[image["id"]]):
        from pycocotools import mask as mask_util

        m = mask_util.decode({"size": inst["segmentation"]["size"], "counts": inst["segmentation"]["counts"].encode()})
        w = cv2.resize(m.astype(np.float32), (4, 4), interpolation=cv2.INTER_AREA).ravel()
        ref = (w @ keys) / w.sum()
        np.testing.assert_allclose(row, ref / np.linalg.norm(ref), atol=1e-5)
    # A box without a mask weighs its box; a sliver thinner than a patch still gets a patch.
    w = patch_weights([{"bbox": [0, 0, 32, 32]}, {"bbox": [50, 10, 0.5, 0.5]}], 64, 64, 4)
    assert w[0].reshape(4, 4)[:2, :2].tolist() == [[1.0, 1.0], [1.0, 1.0]] and w[0].sum() == 4
    assert w[1].sum() > 0
