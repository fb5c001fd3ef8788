"""Alignment distance, SSLMem, LayerMem / ΔLayerMem: hand-computed cases, residuals, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from memprobe.backends.torch_hooks import HookPoint, run_with_hooks
from memprobe.capture import capture_augmented
from memprobe.errors import MemprobeError
from memprobe.localize import (
    alignment_distances,
    delta_layermem,
    layermem,
    residual_sites,
    select_points,
    sslmem,
)
from memprobe.train.simclr import SmallResNet, TinyViT, memorization_split

ROOT = Path(__file__).resolve().parents[1]


class Rep(nn.Module):
    """Representation = the input itself (site 'rep') and its negation (site 'neg')."""

    def __init__(self):
        super().__init__()
        self.rep = nn.Identity()
        self.neg = nn.Identity()
        self.w = nn.Parameter(torch.zeros(1))  # a parameter, so the device can be read

    def forward(self, x):
        r = self.rep(x)
        return self.neg(-r)


def rotate90(x, gen):
    return torch.stack([-x[:, 1], x[:, 0]], dim=1)


def scale2(x, gen):
    return 2 * x


def test_alignment_distance_hand_computed():
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    # a 90-degree rotation moves every unit vector by sqrt(2)
    d = alignment_distances(capture_augmented(Rep(), x, ["rep", "neg"], augment=rotate90, n_aug=3))
    torch.testing.assert_close(d["rep"], torch.full((2,), math.sqrt(2), dtype=torch.float64))
    torch.testing.assert_close(d["neg"], torch.full((2,), math.sqrt(2), dtype=torch.float64))
    # scaling does not move an L2-normalised representation
    d = alignment_distances(capture_augmented(Rep(), x, ["rep"], augment=scale2, n_aug=2))
    torch.testing.assert_close(d["rep"], torch.zeros(2, dtype=torch.float64))


def test_alignment_distance_is_the_mean_over_augmentations():
    calls = {"n": 0}

    def alternate(x, gen):  # first view rotated (distance sqrt 2), second unchanged (0)
        calls["n"] += 1
        return rotate90(x, gen) if calls["n"] % 2 else x

    d = alignment_distances(capture_augmented(Rep(), torch.tensor([[0.0, 2.0]]), ["rep"], augment=alternate, n_aug=2))
    assert d["rep"].item() == pytest.approx(math.sqrt(2) / 2)


def test_augment_runs_before_preprocess():
    seen = []

    def aug(x, gen):
        seen.append(("aug", float(x.max())))
        return x

    def pre(x):
        seen.append(("pre", float(x.max())))
        return x * 10

    alignment_distances(capture_augmented(Rep(), torch.ones(2, 2), ["rep"], augment=aug, n_aug=1, preprocess=pre))
    assert [s[0] for s in seen] == ["aug", "pre"] and seen[0][1] == 1.0


def test_f_and_g_see_the_same_augmentations():
    torch.manual_seed(0)
    m = SmallResNet().eval()
    x = torch.rand(6, 1, 28, 28)

    def noisy(x, gen):
        return (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(0, 1)

    d = alignment_distances(capture_augmented({"f": m, "g": m}, x, ["layer1", "pool"], augment=noisy, n_aug=3, batch_size=4))
    for s in ("layer1", "pool"):
        torch.testing.assert_close(d["f"][s], d["g"][s])
        assert (d["f"][s] > 0).all()


def test_sslmem_hand_computed():
    d_f = torch.tensor([0.1, 0.2, 0.5])
    d_g = torch.tensor([0.3, 0.2, 0.4])
    s = sslmem(d_f, d_g)
    torch.testing.assert_close(s.raw, torch.tensor([0.2, 0.0, -0.1], dtype=torch.float64))
    torch.testing.assert_close(s.by_sum, torch.tensor([0.5, 0.0, -0.1 / 0.9], dtype=torch.float64))
    torch.testing.assert_close(s.by_range, torch.tensor([0.2, 0.0, -0.1], dtype=torch.float64) / 0.3)
    same = sslmem(torch.ones(3), torch.ones(3))
    assert same.by_range.tolist() == [0.0, 0.0, 0.0]
    assert sslmem(torch.zeros(2), torch.zeros(2)).by_sum.tolist() == [0.0, 0.0]


def test_sslmem_mismatched_point_sets():
    with pytest.raises(MemprobeError, match="different point sets"):
        sslmem(torch.ones(3), torch.ones(4))
    with pytest.raises(MemprobeError, match="mismatched point sets"):
        sslmem(torch.ones(3), torch.ones(3), ids_f=[1, 2, 3], ids_g=[1, 2, 4])
    with pytest.raises(MemprobeError, match="for both f and g"):
        sslmem(torch.ones(3), torch.ones(3), ids_f=[1, 2, 3])
    with pytest.raises(MemprobeError, match="different sites"):
        layermem({"a": torch.ones(2)}, {"b": torch.ones(2)})
    s = sslmem(torch.ones(3), torch.ones(3) * 2, ids_f=np.array([5, 6, 7]), ids_g=[5, 6, 7])
    assert s.raw.tolist() == [1.0, 1.0, 1.0]


def test_layermem_and_delta_hand_computed():
    d_f = {"l1": torch.tensor([1.0, 1.0, 1.0, 1.0]), "l2": torch.tensor([0.5, 1.0, 1.0, 2.0])}
    d_g = {"l1": torch.tensor([1.0, 1.0, 1.0, 3.0]), "l2": torch.tensor([1.5, 1.0, 1.0, 2.0])}
    # raw l1 = [0, 0, 0, 2] (range 2), raw l2 = [1, 0, 0, 0] (range 1)
    res = layermem(d_f, d_g, [0, 3], norm="raw")
    assert res.layermem == {"l1": 1.0, "l2": 0.5}
    assert res.delta == {"l1": 1.0, "l2": -0.5}
    res = layermem(d_f, d_g, [0, 3], norm="range")
    assert res.layermem == {"l1": pytest.approx(0.5), "l2": pytest.approx(0.5)}
    res = layermem(d_f, d_g, None, norm="sum")  # l1: [0,0,0,0.5] l2: [0.5,0,0,0]
    assert res.layermem == {"l1": pytest.approx(0.125), "l2": pytest.approx(0.125)}
    assert delta_layermem({"a": 0.1, "b": 0.3, "c": 0.25}) == pytest.approx({"a": 0.1, "b": 0.2, "c": -0.05})
    with pytest.raises(MemprobeError, match="out of range"):
        layermem(d_f, d_g, [4])


def test_select_points():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7])
    assert select_points(scores, top=2).tolist() == [1, 3]
    r = select_points(scores, random=3, seed=1)
    assert len(set(r.tolist())) == 3
    assert r.tolist() == select_points(scores, random=3, seed=1).tolist()
    with pytest.raises(MemprobeError):
        select_points(scores, top=5)


def test_block_site_keeps_the_residual_addition():
    torch.manual_seed(0)
    m = SmallResNet().eval()
    x = torch.rand(3, 1, 28, 28)
    pts = {s: HookPoint(s) for s in ("layer1", "layer2", "layer2.bn2", "stem")}
    got = run_with_hooks(m, pts, x, stop_early=False)
    blk = m.layer2
    with torch.no_grad():
        h = got["layer1"]
        manual = blk.act2(blk.bn2(blk.conv2(blk.act1(blk.bn1(blk.conv1(h))))) + blk.shortcut(h))
    torch.testing.assert_close(got["layer2"], manual)
    # the residual branch alone (what a children()-slicing extractor would read) is different
    assert not torch.allclose(got["layer2"], torch.relu(got["layer2.bn2"]))
    assert SmallResNet.layer_sites()[-1] == "pool" and "layer4" in SmallResNet.layer_sites()


def test_residual_sites_vit_halves():
    torch.manual_seed(0)
    m = TinyViT(depth=2).eval()
    sites = residual_sites(m)
    assert list(sites) == ["L0.attn", "L0.mlp", "L1.attn", "L1.mlp"]
    x = torch.rand(2, 1, 28, 28)
    got = run_with_hooks(m, {**sites, "in": HookPoint("blocks.0", "input")}, x, stop_early=False)
    b = m.blocks[0]
    with torch.no_grad():
        attn_half = got["in"] + b.attn(b.ln1(got["in"]))
        mlp_half = attn_half + b.mlp(b.ln2(attn_half))
    torch.testing.assert_close(got["L0.attn"], attn_half)
    torch.testing.assert_close(got["L0.mlp"], mlp_half)


def test_residual_sites_llama_keeps_the_residual():
    from memprobe.models import tiny_model

    loaded = tiny_model("llama")
    sites = residual_sites(loaded.model)
    assert list(sites)[:2] == ["L0.attn", "L0.mlp"]
    ids = torch.tensor([loaded.encode("hello world")])
    pts = {**sites, "pre": HookPoint("model.layers.0", "input"), "attn": HookPoint("model.layers.0.self_attn")}
    got = run_with_hooks(loaded.model, pts, ids, stop_early=False)
    torch.testing.assert_close(got["L0.attn"], got["pre"] + got["attn"])


def test_residual_sites_unknown_model():
    with pytest.raises(MemprobeError, match="no transformer blocks"):
        residual_sites(nn.Sequential(nn.Linear(2, 2)))


def test_split_is_disjoint_and_seeded():
    s = memorization_split(100, 50, 10, 10, seed=3)
    allidx = torch.cat([s["shared"], s["candidates"], s["independent"]])
    assert len(set(allidx.tolist())) == 70
    assert torch.equal(s["candidates"], memorization_split(100, 50, 10, 10, seed=3)["candidates"])
    with pytest.raises(MemprobeError, match="needs 130 points"):
        memorization_split(100, 100, 15, 15)


def test_missing_dataset_is_a_clear_error(tmp_path, monkeypatch):
    import memprobe.datasets as dsmod

    with pytest.raises(MemprobeError, match="apt-get install dataset-fashion-mnist"):
        dsmod.fashion_mnist(root=tmp_path)
    real = dsmod.fashion_mnist
    monkeypatch.setattr(dsmod, "fashion_mnist", lambda split="train": real(split, root=tmp_path))
    with pytest.warns(UserWarning, match="falling back to sklearn digits"):
        ds = dsmod.load_images("fashion-mnist")
    assert ds.name == "sklearn-digits"


def test_training_resumes_exactly_from_a_checkpoint(tmp_path):
    from memprobe.train.simclr import TrainConfig, load_encoder, train_encoder

    torch.set_num_threads(1)
    x = torch.rand(48, 1, 28, 28)
    cfg = TrainConfig(mode="simclr", epochs=2, batch_size=24, warmup_epochs=1, seed=5)
    full, _ = train_encoder(x, None, cfg, tmp_path / "full.safetensors", log=None)

    class Interrupt(Exception):
        pass

    def stop_after_first_epoch(msg):
        raise Interrupt(msg)

    with pytest.raises(Interrupt):
        train_encoder(x, None, cfg, tmp_path / "cut.safetensors", log=stop_after_first_epoch)
    assert load_encoder(tmp_path / "cut.safetensors")[2]["epoch"] == 1
    resumed, hist = train_encoder(x, None, cfg, tmp_path / "cut.safetensors", log=None)
    assert [h["epoch"] for h in hist] == [1, 2]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(MemprobeError, match="different config"):
        train_encoder(x, None, TrainConfig(mode="simclr", epochs=3, batch_size=24, seed=5), tmp_path / "cut.safetensors")


@pytest.mark.slow
def test_quick_experiment_runs(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("localize_ssl", ROOT / "experiments" / "localize_ssl.py")
    localize_ssl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(localize_ssl)

    out = localize_ssl.main(["--quick", "--out", str(tmp_path / "r.json"), "--figures", str(tmp_path / "fig"),
                             "--ckpt-dir", str(tmp_path / "ckpt")])
    assert (tmp_path / "r.json").exists()
    assert set(out["findings"]) >= {"F1_layermem_grows_with_depth", "F3_ssl_more_point_selective_units_than_sl"}
    assert len(list((tmp_path / "fig").glob("localize_ssl_*.png"))) >= 5
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) == 4
    sites = out["layers"]["resnet_ssl"]["sites"]
    assert sites == SmallResNet.layer_sites()
