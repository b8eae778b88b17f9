"""Utilities: robust image decoding of odd files, atomic writes, device selection, catalog, logging."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cutler.data.catalog import get_dataset
from cutler.utils import DeviceUnavailableError, atomic_write_json, atomic_write_text, resolve_device
from cutler.utils.image import ImageReadError, image_size, list_images, read_image_rgb


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_decodes_every_odd_but_valid_image(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    cases = {
        "gray.png": Image.fromarray(rgb[:, :, 0], "L"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((20, 30), 255, np.uint8)]), "RGBA"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "sixteen.png": Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257),
    }
    for name, img in cases.items():
        out = read_image_rgb(_save(img, tmp_path / name))
        assert out.shape == (20, 30, 3) and out.dtype == np.uint8, name
    # 16-bit values scale to 8 bits exactly: v * 257 / 65535 * 255 == v.
    assert np.array_equal(read_image_rgb(tmp_path / "sixteen.png")[:, :, 0], rgb[:, :, 0])
    # Fully opaque RGBA keeps its colours; so do transparent pixels: alpha is dropped, as PIL's convert("RGB")
    # (the published MaskCut script, Detectron2's reader) does, not composited onto a background.
    assert np.array_equal(read_image_rgb(tmp_path / "rgba.png"), rgb)
    alpha = np.full((20, 30), 255, np.uint8)
    alpha[:, :10] = 0
    alpha[:, 10:20] = 100
    see_through = _save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), tmp_path / "see_through.png")
    assert np.array_equal(read_image_rgb(see_through), rgb)
    la = _save(Image.fromarray(np.dstack([rgb[:, :, 0], alpha]), "LA"), tmp_path / "la.png")
    assert np.array_equal(read_image_rgb(la), np.repeat(rgb[:, :, :1], 3, axis=2))


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 40, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes())
    assert read_image_rgb(path).shape == (40, 10, 3)
    assert image_size(path) == (10, 40)


@pytest.mark.parametrize("name, content, reason", [
    ("empty.jpg", b"", "empty"),
    ("text.jpg", b"this is not an image", "not an image"),
])
def test_bad_files_raise_with_path_and_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as err:
        read_image_rgb(path)
    assert name in str(err.value) and reason in err.value.reason


def test_truncated_and_tiny_images(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="trunc.jpg"):
        read_image_rgb(tmp_path / "trunc.jpg")
    _save(Image.new("RGB", (4, 4)), tmp_path / "tiny.png")
    with pytest.raises(ImageReadError, match="too small"):
        read_image_rgb(tmp_path / "tiny.png", min_size=8)
    with pytest.raises(ImageReadError, match="not found"):
        read_image_rgb(tmp_path / "missing.png")


def test_list_images_recurses_and_sorts(tmp_path):
    for p in ("b/x.JPEG", "a/y.png", "a/z.txt", "c.jpg"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(b"0")
    assert list_images(tmp_path) == ["a/y.png", "b/x.JPEG", "c.jpg"]


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"a": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": Boom()})
    assert path.read_text() == '{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    atomic_write_text(path, "x")
    assert path.read_text() == "x"


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
            resolve_device("cuda")


def test_catalog_resolves_under_root_and_suggests(tmp_path):
    ds = get_dataset("coco_2017_val", tmp_path)
    assert ds.image_root == (tmp_path / "coco/val2017").resolve() and not ds.exists()
    with pytest.raises(KeyError, match="coco_2017_val"):
        get_dataset("coco_2017_vall")
    direct = get_dataset(f"{tmp_path}/labels/r1.json@{tmp_path}/imgs")
    assert direct.json_file == tmp_path / "labels/r1.json" and direct.image_root == tmp_path / "imgs"
    assert get_dataset(f"{tmp_path}/r1.json").image_root == tmp_path


def test_seed_everything_reproduces():
    from cutler.utils import seed_everything

    seed_everything(3)
    a = (torch.rand(3), np.random.rand())
    assert seed_everything(3) == 3
    b = (torch.rand(3), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert seed_everything(-1) >= 0


def test_overlay_draws_colours_inside_masks():
    from cutler.utils.visualization import overlay_instances

    img = np.zeros((20, 20, 3), np.uint8)
    m = np.zeros((1, 20, 20), bool)
    m[0, 5:15, 5:15] = True
    out = overlay_instances(img, m, np.array([[5, 5, 15, 15]]), scores=[0.9])
    assert out[10, 10].sum() > 0 and out[0, 19].sum() == 0 and img.sum() == 0


def test_iter_json_array_streams_what_json_load_reads(tmp_path):
    from cutler.utils.io import iter_json_array

    tricky = 'a],[{"b\\'  # brackets, a quote and a backslash inside a string
    items = [{"image_id": i, "score": i / 7, "segmentation": {"size": [3, 4], "counts": tricky + str(i)},
              "nested": [[1, 2.5e-3, None, True], {"k": "é ∑"}]} for i in range(23)] + [17, -0.5, "x, ]", [], {}]
    path = tmp_path / "results.json"
    path.write_text("  \n[ " + ",\n ".join(json.dumps(x) for x in items) + " ]\n", encoding="utf-8")
    for read_bytes in (1, 7, 64, 1 << 20):
        blocks = list(iter_json_array(path, block_size=4, read_bytes=read_bytes))
        assert [len(b) for b in blocks] == [4] * 7
        assert [x for b in blocks for x in b] == json.loads(path.read_text(encoding="utf-8"))
    (tmp_path / "empty.json").write_text("[]")
    assert list(iter_json_array(tmp_path / "empty.json")) == []
    bad = {"dict.json": '{"a": 1}', "trunc.json": '[{"a": 1}, {"b"', "noclose.json": '[{"a": 1}',
           "sep.json": '[{"a": 1} {"b": 2}]', "blank.json": ""}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name):
            list(iter_json_array(tmp_path / name, read_bytes=5))
