"""STEGO: the correspondence loss against a direct evaluation of its formula, the head learning on a fixed
batch, the multi-label CRF against pydensecrf, and a tiny train -> resume -> label run on synthetic images."""
import json

import numpy as np
import pytest
import torch

from cutler.config.schema import StegoConfig
from cutler.u2seg.stego import (STEGO_CRF, PairWeights, StegoHead, correspondence_loss, crf_refine,
                                stego_pair_losses)


def _direct_loss(f1, f2, c1, c2, shift, pointwise, zero_clamp):
    """-1/N sum_hwij (F_hwij - b) max(S_hwij, 0), one term at a time."""
    def unit(v):
        return v / max(float(np.linalg.norm(v)), 1e-10)

    f1, f2, c1, c2 = (t.double().numpy() for t in (f1, f2, c1, c2))
    b, _, h, w = f1.shape
    _, _, hi, wj = f2.shape
    fcorr = np.zeros((b, h, w, hi, wj))
    scorr = np.zeros((b, h, w, hi, wj))
    for n in range(b):
        for y in range(h):
            for x in range(w):
                for i in range(hi):
                    for j in range(wj):
                        fcorr[n, y, x, i, j] = unit(f1[n, :, y, x]) @ unit(f2[n, :, i, j])
                        scorr[n, y, x, i, j] = unit(c1[n, :, y, x]) @ unit(c2[n, :, i, j])
    if pointwise:
        total_mean = fcorr.mean()
        for n in range(b):
            for y in range(h):
                for x in range(w):
                    fcorr[n, y, x] = fcorr[n, y, x] - fcorr[n, y, x].mean() + total_mean
    total = 0.0
    for idx in np.ndindex(fcorr.shape):
        s = max(scorr[idx], 0.0) if zero_clamp else scorr[idx]
        total += (fcorr[idx] - shift) * s
    return -total / fcorr.size


@pytest.mark.parametrize("pointwise,zero_clamp", [(True, True), (False, False)])
def test_correspondence_loss_matches_the_formula_term_by_term(pointwise, zero_clamp):
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(2, 5, 3, 2, generator=g), torch.randn(2, 5, 2, 3, generator=g)
    c1, c2 = torch.randn(2, 4, 3, 2, generator=g), torch.randn(2, 4, 2, 3, generator=g)
    loss, _ = correspondence_loss(f1, f2, c1, c2, 0.3, pointwise=pointwise, zero_clamp=zero_clamp)
    assert float(loss) == pytest.approx(_direct_loss(f1, f2, c1, c2, 0.3, pointwise, zero_clamp), rel=1e-5)


def test_head_learns_the_feature_correspondence_on_a_fixed_batch():
    """Features with two planted regions per image and a head started collapsed (every code the same): training
    lowers the loss and the codes come to separate the regions."""
    torch.manual_seed(0)
    b, cdim, h, w = 4, 16, 6, 6
    protos = torch.randn(2, cdim)
    region = torch.zeros(b, h, w, dtype=torch.long)
    region[:, :, 3:] = 1
    feats = protos[region].permute(0, 3, 1, 2) + 0.3 * torch.randn(b, cdim, h, w)
    knn = protos[region.flip(-1)].permute(0, 3, 1, 2) + 0.3 * torch.randn(b, cdim, h, w)
    head = StegoHead(cdim, 8, dropout=0.0)
    with torch.no_grad():
        for conv in (head.linear, head.nonlinear[2]):
            conv.weight.mul_(0.01)
            conv.bias.fill_(1.0)
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    weights = PairWeights.from_config(StegoConfig(feature_samples=5, neg_samples=2))

    def evaluate():
        with torch.no_grad():
            loss = stego_pair_losses(feats, knn, head(feats), head(knn), weights, torch.Generator().manual_seed(99))
            code = torch.nn.functional.normalize(head(feats), dim=1)
        inside = float((code[:, :, :, 0] * code[:, :, :, 1]).sum(1).mean())
        across = float((code[:, :, :, 0] * code[:, :, :, 5]).sum(1).mean())
        return float(loss["loss"]), inside, across

    loss0, inside0, across0 = evaluate()
    assert across0 > 0.99  # collapsed start
    for step in range(40):
        out = stego_pair_losses(feats, knn, head(feats), head(knn), weights, torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    loss1, inside1, across1 = evaluate()
    assert loss1 < loss0 - 0.1
    assert inside1 > 0.9 and across1 < 0.3


def test_multilabel_crf_torch_agrees_with_pydensecrf():
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(1, 12, 16, 3, dtype=torch.uint8)
    img[0, :, :6] = 200
    img[0, :, 6:11] = torch.tensor([30, 160, 40], dtype=torch.uint8)
    logits = torch.randn(1, 3, 12, 16, generator=g)
    log_probs = torch.log_softmax(logits, 1)
    ours = crf_refine(img, log_probs, STEGO_CRF, mode="torch")
    ref = crf_refine(img, log_probs, STEGO_CRF, mode="pydensecrf")
    assert (ours == ref).float().mean() >= 0.99
    assert len(torch.unique(ref[0, :, :5])) == 1  # the CRF smooths the noisy unaries inside a uniform region
    assert torch.equal(crf_refine(img, log_probs, mode="none"), log_probs.argmax(1))


def test_stego_train_resume_and_label_inference(tmp_path, synthetic_root):
    from cutler.config import load_config
    from cutler.maskcut.dataset import list_dataset
    from cutler.u2seg.panoptic import read_label_png
    from cutler.u2seg.stego_run import infer_stego, label_path, train_stego

    split = synthetic_root / "synthetic" / "train"
    records, _ = list_dataset(str(split / "annotations.json"), str(split / "images"))
    records = records[:4]
    out = tmp_path / "stego"
    common = ["stego.vit_arch=small", "stego.patch_size=16", "stego.dim=8", "stego.res=32", "stego.batch_size=3",
              "stego.num_workers=0", f"stego.out_dir={out}", "stego.num_clusters=3", "stego.probe_images=8",
              "stego.infer_size=32", "stego.checkpoint_period=2", "stego.log_period=1", "stego.num_neighbors=2",
              "stego.crf=pydensecrf", "stego.dtype=float32"]
    # a run stopped after 2 steps (checkpoint written), then the full run resumes from it
    first = load_config(None, common + ["stego.max_steps=2"]).stego
    ckpt_dir = out / "train"
    ckpt = train_stego(first, records, progress=False)
    (out / "stego_final.pth").unlink()  # the 2-step run finished; pretend it was killed before the probe
    assert ckpt["steps"] == 2 and (ckpt_dir / "checkpoint.pth").is_file()
    cfg = load_config(None, common + ["stego.max_steps=4"]).stego
    res = train_stego(cfg, records, progress=False)
    assert res["steps"] == 4 and res["clusters"] == 3
    logged = [json.loads(line)["iteration"] for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]
    assert np.load(out / "knn" / "nns.npy").shape == (4 * 5, 2)
    # labels for every image at its own size, values in 1..S; a rerun has nothing left to do
    bad = records[0].__class__(999, "missing.png", str(tmp_path / "missing.png"))
    summary = infer_stego(cfg, records + [bad], progress=False)
    assert (summary["processed"], summary["failed"]) == (4, 1)
    sizes = {im["id"]: (im["height"], im["width"]) for im in json.loads((split / "annotations.json").read_text())["images"]}
    for r in records:
        lab = read_label_png(label_path(out, r.file_name))
        assert lab.shape == sizes[r.id] and lab.min() >= 1 and lab.max() <= 3
    again = infer_stego(cfg, records + [bad], progress=False)
    assert (again["processed"], again["skipped_already_done"]) == (0, 5)
