"""UnitMem / ClassMem: formulas on hand-computed cases, streaming == in-memory, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from memprobe.capture import capture_augmented
from memprobe.errors import MemprobeError
from memprobe.localize import (
    ClassMemAccumulator,
    UnitMemAccumulator,
    classmem,
    stream_unitmem,
    unit_points,
    unitmem,
)


def acts_from_means(means: list[list[float]], n_aug: int = 2) -> np.ndarray:
    """(points, units) means -> (points, n_aug, units) activations whose augmentation mean is `means`:
    augmentation a gets mean * (1 + (-1)^a * 0.5), so the individual views differ."""
    m = np.asarray(means, dtype=float)
    factors = np.array([1 + 0.5 * (-1) ** a for a in range(n_aug)])
    if n_aug % 2:
        factors[-1] = 1.0
    return m[:, None, :] * factors[None, :, None]


def test_hand_computed_mean_and_median():
    # unit 0: point means [1, 0, 0, 0] -> mu_max 1, rest 0 -> 1
    # unit 1: [4, 0, 0, 3] -> mean of rest = 1 -> (4-1)/(4+1) = 0.6; median of rest = 0 -> 1.0
    # unit 2: [2, 2, 2, 2] -> 0 (not selective at all)
    # unit 3: [3, 1, 2, 6] -> mean of rest = 2 -> 4/8 = 0.5; median of rest = 2 -> 0.5
    acts = acts_from_means([[1, 4, 2, 3], [0, 0, 2, 1], [0, 0, 2, 2], [0, 3, 2, 6]])
    np.testing.assert_allclose(unitmem(acts, reduce="mean"), [1.0, 0.6, 0.0, 0.5])
    np.testing.assert_allclose(unitmem(acts, reduce="median"), [1.0, 1.0, 0.0, 0.5])


def test_median_even_number_of_other_points_averages_middle_values():
    # means [10, 1, 3, 0, 4]: others [1, 3, 0, 4] -> median (1 + 3) / 2 = 2 -> (10-2)/(10+2)
    acts = np.array([10, 1, 3, 0, 4], dtype=float).reshape(5, 1, 1)
    np.testing.assert_allclose(unitmem(acts, reduce="median"), [8 / 12])
    np.testing.assert_allclose(unitmem(acts, reduce="mean"), [(10 - 2) / (10 + 2)])


def test_augmentations_are_averaged_before_the_max():
    # point 0 views [0, 4] (mean 2), point 1 views [3, 3] (mean 3): the max is point 1's mean, not 4
    acts = np.array([[[0.0], [4.0]], [[3.0], [3.0]]])
    np.testing.assert_allclose(unitmem(acts), [(3 - 2) / (3 + 2)])
    vals, arg = unitmem(acts, return_argmax=True)
    assert arg.tolist() == [1]


def test_torch_and_numpy_give_the_same_values_and_types():
    rng = np.random.default_rng(0)
    acts = rng.random((30, 5, 8))
    out_np = unitmem(acts)
    out_t = unitmem(torch.from_numpy(acts).float())
    assert isinstance(out_np, np.ndarray) and out_np.shape == (8,)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32 and out_t.shape == (8,)
    np.testing.assert_allclose(out_t.numpy(), out_np, rtol=1e-5)
    assert ((out_np >= 0) & (out_np <= 1)).all()


def test_dead_units_are_zero_not_nan():
    acts = np.zeros((5, 3, 2))
    acts[:, :, 1] = 1.0
    out = unitmem(acts)
    assert np.isfinite(out).all()
    assert out.tolist() == [0.0, 0.0]
    assert unitmem(acts, reduce="median").tolist() == [0.0, 0.0]


def test_unit_firing_for_one_point_only_is_one():
    acts = np.zeros((6, 2, 1))
    acts[3, :, 0] = 0.7
    assert unitmem(acts).tolist() == [1.0]


def test_negative_activations_error_clip_abs():
    acts = np.array([[[2.0], [-1.0]], [[1.0], [1.0]], [[0.5], [0.5]]])
    with pytest.raises(MemprobeError, match="negative values.*negatives='clip'"):
        unitmem(acts)
    # clip: views -> [2, 0], [1, 1], [0.5, 0.5]: means 1, 1, 0.5 -> max 1, rest (1 + 0.5)/2 = 0.75
    np.testing.assert_allclose(unitmem(acts, negatives="clip"), [(1 - 0.75) / (1 + 0.75)])
    # abs: means 1.5, 1, 0.5 -> rest 0.75
    np.testing.assert_allclose(unitmem(acts, negatives="abs"), [(1.5 - 0.75) / (1.5 + 0.75)])
    acc = UnitMemAccumulator()
    with pytest.raises(MemprobeError, match="negative"):
        acc.update(acts)


def test_bad_shapes_and_single_point():
    with pytest.raises(MemprobeError, match="at least 2 points"):
        unitmem(np.ones((1, 4, 3)))
    with pytest.raises(MemprobeError, match=r"\(points, augmentations, units\)"):
        unitmem(np.ones((4, 3)))
    with pytest.raises(MemprobeError, match="NaN"):
        unitmem(np.full((3, 2, 2), np.nan))
    with pytest.raises(MemprobeError, match="reduce"):
        unitmem(np.ones((3, 2, 2)), reduce="max")
    acc = UnitMemAccumulator()
    acc.update(np.ones((1, 2, 3)))
    with pytest.raises(MemprobeError, match="at least 2 points"):
        acc.compute()
    with pytest.raises(MemprobeError, match="units"):
        acc.update(np.ones((2, 2, 4)))


@pytest.mark.parametrize("batch", [1, 3, 7, 64])
def test_streaming_equals_in_memory(batch):
    rng = np.random.default_rng(batch)
    acts = rng.gamma(0.5, size=(101, 4, 17))
    acts[:, :, 0] = 0  # a dead unit
    acts[17, :, 5] = 50  # one point dominates one unit
    acc = UnitMemAccumulator(keep_means=True)
    for i in range(0, len(acts), batch):
        acc.update(torch.from_numpy(acts[i : i + batch]))
    ref, ref_arg = unitmem(acts, return_argmax=True)
    np.testing.assert_allclose(acc.compute().numpy(), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.compute("median").numpy(), unitmem(acts, reduce="median"), rtol=1e-12)
    assert acc.argmax.tolist() == ref_arg.tolist()
    assert acc.n_points == 101


def test_streaming_state_does_not_grow_with_points():
    acc = UnitMemAccumulator()
    acc.update(np.ones((10, 2, 32)))
    size = acc.state_bytes
    for _ in range(50):
        acc.update(np.random.default_rng(0).random((100, 2, 32)))
    assert acc.state_bytes == size == 32 * (8 + 8 + 8)
    with pytest.raises(MemprobeError, match="keep_means"):
        acc.compute("median")


def test_update_means_matches_update():
    rng = np.random.default_rng(1)
    acts = rng.random((20, 3, 6))
    a, b = UnitMemAccumulator(), UnitMemAccumulator()
    a.update(acts)
    b.update_means(acts.mean(axis=1))
    np.testing.assert_allclose(a.compute().numpy(), b.compute().numpy(), rtol=1e-12)


def test_classmem_hand_computed():
    # unit 0: point means [1, 3 | 0, 0] -> class means [2, 0] -> 1
    # unit 1: [1, 1 | 2, 2 | 6, 6 | 0, 0] with 4 classes: class means [1, 2, 6, 0]
    #   mean of rest = 1 -> (6-1)/(6+1) = 5/7; median of rest [1, 2, 0] = 1 -> 5/7
    # unit 2: class means [4, 0, 0, 3] -> mean 0.6, median 1.0
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    means = np.array([
        [1, 1, 4], [3, 1, 4], [0, 2, 0], [0, 2, 0], [0, 6, 0], [0, 6, 0], [0, 0, 3], [0, 0, 3],
    ], dtype=float)
    acts = acts_from_means(means.tolist(), n_aug=3)
    np.testing.assert_allclose(classmem(acts, labels), [1.0, 5 / 7, 0.6])
    np.testing.assert_allclose(classmem(acts, labels, reduce="median"), [1.0, 5 / 7, 1.0])
    vals, cls = classmem(acts, labels, return_argmax=True)
    assert cls.tolist() == [0, 2, 0]


def test_classmem_groups_by_class_unlike_unitmem():
    # two points of class 0 fire, all others silent: not single-point selective, but class selective
    acts = np.zeros((6, 2, 1))
    acts[0:2, :, 0] = 1.0
    labels = [0, 0, 1, 1, 2, 2]
    assert classmem(acts, labels).tolist() == [1.0]
    assert unitmem(acts)[0] == pytest.approx((1 - 0.2) / (1 + 0.2))


def test_classmem_accumulator_and_bad_input():
    rng = np.random.default_rng(2)
    acts = rng.random((40, 3, 5))
    labels = rng.integers(0, 4, 40)
    acc = ClassMemAccumulator()
    for i in range(0, 40, 9):
        acc.update(acts[i : i + 9], labels[i : i + 9])
    np.testing.assert_allclose(acc.compute().numpy(), classmem(acts, labels), rtol=1e-12)
    np.testing.assert_allclose(acc.compute("median").numpy(), classmem(acts, labels, reduce="median"), rtol=1e-12)
    with pytest.raises(MemprobeError, match="at least 2 classes"):
        classmem(acts, np.zeros(40))
    with pytest.raises(MemprobeError, match="labels has 3 entries"):
        classmem(acts, [0, 1, 2])


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 6)
        self.act2 = nn.ReLU()

    def forward(self, x):
        h = self.act(self.conv(x))
        return self.act2(self.fc(h.flatten(1)))


def noise_augment(x, gen):
    return (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def test_stream_unitmem_over_a_model_matches_unitmem_on_captured_activations():
    model = TinyConv().eval()
    x = torch.rand(13, 1, 8, 8)
    n_aug, bs = 3, 5
    accs = stream_unitmem(capture_augmented(model, x, unit_points(["act", "act2"]), augment=noise_augment,
                                            n_aug=n_aug, include_original=False, batch_size=bs, seed=7),
                          keep_means=True)
    # recompute by hand: same generator, same batching, views augmentation-major, all in memory
    gen = torch.Generator().manual_seed(7)
    conv_acts, fc_acts = [], []
    with torch.no_grad():
        for i in range(0, 13, bs):
            xb = x[i : i + bs]
            views = torch.cat([noise_augment(xb, gen) for _ in range(n_aug)])
            h = model.act(model.conv(views))
            conv_acts.append(h.mean(dim=(2, 3)).reshape(n_aug, len(xb), 4).transpose(0, 1))
            fc_acts.append(model.act2(model.fc(h.flatten(1))).reshape(n_aug, len(xb), 6).transpose(0, 1))
    torch.testing.assert_close(accs["act"].compute(), unitmem(torch.cat(conv_acts).double()))
    torch.testing.assert_close(accs["act2"].compute(), unitmem(torch.cat(fc_acts).double()))
    torch.testing.assert_close(accs["act"].compute("median"), unitmem(torch.cat(conv_acts).double(), reduce="median"))


def test_stream_unitmem_refuses_pre_relu_site_and_single_point():
    model = TinyConv().eval()
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(MemprobeError, match="negative"):
        stream_unitmem(capture_augmented(model, x, ["conv"], augment=noise_augment, n_aug=2, include_original=False))
    assert torch.is_grad_enabled()  # the abandoned capture generator left gradients on
    accs = stream_unitmem(capture_augmented(model, x, ["conv"], augment=noise_augment, n_aug=2, include_original=False),
                          negatives="clip")
    assert accs["conv"].compute().shape == (4,)
    with pytest.raises(MemprobeError, match="at least 2 points"):
        stream_unitmem(capture_augmented(model, x[:1], ["act"], augment=noise_augment, n_aug=2, include_original=False))


# ------------------------------------------------------------------ text points and augmentations
def _text_module():
    from memprobe.localize import text_units

    return text_units


def _text_experiment():
    """experiments/unitmem_text.py, loaded from its file (experiments are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "unitmem_text.py"
    spec = importlib.util.spec_from_file_location("unitmem_text_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_perturbations_preserve_the_words():
    import random
    import re

    ut = _text_module()
    text = "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him."
    rng = random.Random(0)

    def words(t):
        return set(re.sub(r"[^\w\s']", "", t).lower().split())

    views = [ut.perturb_text(text, rng) for _ in range(50)]
    assert all(v != text for v in views)
    assert all(words(v) <= words(text) for v in views)  # no new words: dropout and casing only
    assert len(set(views)) > 10


def test_speeches_skip_stage_directions_over_several_lines(tmp_path):
    ut = _text_module()
    md = tmp_path / "play.md"
    md.write_text(
        "# Play\n\n### SCENE I.\n\n_Here an alarum:\nthen enter JOAN, driving Englishmen\nthen exit_\n\n"
        "**TALBOT**  \nMy thoughts are whirled like a potter's wheel; I know not where I am, nor what I do.\n\n"
        "**FORD**  \n[Aside]_  \nI think I shall drink in pipe wine first with him; I'll make him dance.\n"
    )
    got = ut.speeches(md, min_words=5)
    assert got == [
        "My thoughts are whirled like a potter's wheel; I know not where I am, nor what I do.",
        "I think I shall drink in pipe wine first with him; I'll make him dance.",
    ]


@pytest.mark.slow
@pytest.mark.real
def test_text_experiment_quick(tmp_path):
    ut = _text_experiment()
    out = ut.main(["--quick", "--out", str(tmp_path / "t.json"), "--figure", str(tmp_path / "t.png")])
    assert (tmp_path / "t.png").exists()
    sm = out["models"]["smollm2-135m"]["by_negatives"]
    assert set(sm) == {"clip", "abs"}
    for block in (sm["clip"], out["models"]["all-minilm-l6-v2"]["by_negatives"]["clip"]):
        for layer in block["per_layer"].values():
            assert 0.0 <= layer["unitmem"]["mean"] <= 1.0 and 0.0 <= layer["classmem"]["mean"] <= 1.0
