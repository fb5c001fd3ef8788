import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from interrupt import Interrupted, stop_after

from memprobe.capture import capture_outputs, pad_batch, pad_id
from memprobe.errors import MemprobeError
from memprobe.models import tiny_model
from memprobe.predict import counterfactual_memorization, feldman_memorization, train_shadows
from memprobe.predict.apriori import average_precision, evaluate_predictors
from memprobe.train.classifier import TrainConfig, predict_logits, train_classifier
from memprobe.train.lm_classifier import (
    LoRALastTokenClassifier,
    LoRASpec,
    frozen_prefix,
    shadow_train_fn,
)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("red", "blue", "green", "gold", "grey", "pink", "teal", "plum")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", n_layers=3)


def planted(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Class = whether the text's last word is 'yes' or 'no'; a unique number and colour words of varied
    length come before it (unique texts: a flipped label can be memorized)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    ids = rng.permutation(9000)[:n] + 1000
    texts = [f"{i} " + " ".join(rng.choice(WORDS, rng.integers(1, 4))) + (" yes" if c else " no")
             for i, c in zip(ids, y, strict=True)]
    return texts, y


def test_prefix_cache_is_reused_only_for_the_same_inputs(tiny, tmp_path, monkeypatch):
    import memprobe.train.lm_classifier as lm

    texts, _ = planted(6)
    path = tmp_path / "prefix.safetensors"
    first = frozen_prefix(tiny, texts, 1, cache_path=path)
    fresh_reversed = frozen_prefix(tiny, texts[::-1], 1)
    real_run = lm._run_prefix

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although the cache holds these inputs")

    monkeypatch.setattr(lm, "_run_prefix", refuse)
    again = frozen_prefix(tiny, texts, 1, cache_path=path)
    torch.testing.assert_close(again.hidden, first.hidden)
    torch.testing.assert_close(again.last_token["layer0"], first.last_token["layer0"])
    assert torch.equal(again.lengths, first.lengths)
    monkeypatch.setattr(lm, "_run_prefix", real_run)
    other = frozen_prefix(tiny, texts[::-1], 1, cache_path=path)  # other inputs: recomputed, not reused
    torch.testing.assert_close(other.hidden, fresh_reversed.hidden)


def test_prefix_plus_trained_blocks_equal_the_full_model(tiny):
    texts, _ = planted(12)
    prefix = frozen_prefix(tiny, texts, cut=1, max_tokens=32)
    assert len(set(prefix.lengths.tolist())) > 1  # varied lengths: padding must not leak into the last token
    clf = LoRALastTokenClassifier(tiny.model, prefix, 2, LoRASpec(train_layers=2))  # LoRA B = 0 at init
    got = {k: torch.from_numpy(v) for k, v in  # the capture path the a-priori study uses: (n, 1) index rows
           capture_outputs(clf, torch.arange(12)[:, None], ["taps.norm", "taps.block1"], batch_size=5).items()}
    ids, mask = pad_batch([tiny.encode(t)[:32] for t in texts], pad_id(tiny))
    with torch.no_grad():
        out = tiny.model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    rows, last = torch.arange(12), mask.sum(1) - 1
    torch.testing.assert_close(got["taps.norm"], out.last_hidden_state[rows, last], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["taps.block1"], out.hidden_states[2][rows, last], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefix.last_token["layer0"], out.hidden_states[1][rows, last])
    # a checkpoint holds only what trains: LoRA adapters and the head, never the pretrained weights
    state = clf.state_dict()
    assert state and all("lora_" in k or k.startswith("head.") for k in state)
    assert {"head.weight", "head.bias"} <= set(state)


def test_learns_a_planted_signal_and_resumes_exactly(tiny, tmp_path):
    texts, y = planted(160, seed=1)
    prefix = frozen_prefix(tiny, texts, cut=2, max_tokens=32)
    train, test = np.arange(120), np.arange(120, 160)
    cfg = TrainConfig(epochs=6, batch_size=16, lr=1e-2, eval_every=5, seed=3)
    y_t = torch.from_numpy(y).long()

    def make():
        torch.manual_seed(0)
        return LoRALastTokenClassifier(tiny.model, prefix, 2, LoRASpec(train_layers=1, rank=4))

    straight = make()
    full = train_classifier(straight, torch.from_numpy(train), y_t[train], cfg, checkpoint_dir=tmp_path / "a")
    held_out = predict_logits(straight, torch.from_numpy(test)).argmax(1).numpy()
    assert (held_out == y[test]).mean() >= 0.9  # chance is ~0.5: the signal is read from the last token
    assert full.median_loss()[-1] < 0.5 * full.median_loss()[0]

    broken = stop_after(make(), 13)
    with pytest.raises(Interrupted):
        train_classifier(broken, torch.from_numpy(train), y_t[train], cfg, checkpoint_dir=tmp_path / "b")
    torch.manual_seed(99)  # another init: the resumed run must load the checkpoint
    resumed_model = LoRALastTokenClassifier(tiny.model, prefix, 2, LoRASpec(train_layers=1, rank=4))
    resumed = train_classifier(resumed_model, torch.from_numpy(train), y_t[train], cfg, checkpoint_dir=tmp_path / "b")
    assert resumed.steps == full.steps
    for a, b in zip(full.losses, resumed.losses, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(predict_logits(resumed_model, torch.arange(160)),
                               predict_logits(straight, torch.arange(160)))


def test_shadow_train_fn_contract_and_flipped_labels_are_memorized(tiny):
    texts, clean = planted(64, seed=2)
    y = clean.copy()
    flipped = np.zeros(64, dtype=bool)
    flipped[::8] = True
    y[flipped] = 1 - y[flipped]
    prefix = frozen_prefix(tiny, texts, cut=2, max_tokens=32)
    make = lambda: LoRALastTokenClassifier(tiny.model, prefix, 2, LoRASpec(train_layers=1, rank=4))  # noqa: E731
    train_fn = shadow_train_fn(make, y, TrainConfig(epochs=40, batch_size=16, lr=1e-2))
    first = train_fn(np.arange(32), 5)
    assert first.shape == (64, 2) and np.isfinite(first).all()
    np.testing.assert_allclose(train_fn(np.arange(32), 5), first, rtol=1e-5, atol=1e-5)  # seeded: repeatable
    runs = train_shadows(train_fn, y, 4, seed=0)
    counterfactual, feldman = counterfactual_memorization(runs), feldman_memorization(runs)
    # a flipped label is fitted only by the models that trained on it: that is what memorization means
    assert counterfactual[flipped].mean() > counterfactual[~flipped].mean() + 1.0
    assert feldman[flipped].mean() > 0.5 > feldman[~flipped].mean()
    ev = evaluate_predictors({"cf": counterfactual}, flipped, n_boot=20)
    assert ev["cf"]["average_precision"] > 0.4  # chance: 8/64 and len(ev["cf"]["average_precision_ci95"]) == 2


def test_average_precision_matches_its_definition():
    labels = np.array([1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    assert average_precision(scores, labels) == pytest.approx((1.0 + 2 / 3) / 2)
    assert average_precision(scores[::-1], labels[::-1]) == pytest.approx((1.0 + 2 / 3) / 2)


def test_bad_input_fails_clearly(tiny):
    texts, _ = planted(8)
    prefix = frozen_prefix(tiny, texts, cut=2, max_tokens=32)
    with pytest.raises(MemprobeError, match="recompute frozen_prefix"):
        LoRALastTokenClassifier(tiny.model, prefix, 2, LoRASpec(train_layers=2))
    with pytest.raises(MemprobeError, match="cut must be"):
        frozen_prefix(tiny, texts, cut=3)
    with pytest.raises(MemprobeError, match="empty"):
        frozen_prefix(tiny, ["fine", ""], cut=1)
    with pytest.raises(MemprobeError, match="no LoRA target"):
        LoRALastTokenClassifier(tiny.model, prefix, 2, LoRASpec(train_layers=1, targets=("nonexistent",)))
    clf = LoRALastTokenClassifier(tiny.model, prefix, 2, LoRASpec(train_layers=1))
    other = LoRALastTokenClassifier(tiny.model, prefix, 3, LoRASpec(train_layers=1, rank=2))
    with pytest.raises(MemprobeError, match="same LoRASpec"):
        clf.load_state_dict({k: v for k, v in other.state_dict().items() if "head" not in k})
    with pytest.raises(MemprobeError, match="other shapes"):
        clf.load_state_dict(other.state_dict() | {k: v for k, v in clf.state_dict().items() if "lora" in k})
    with pytest.raises(MemprobeError, match="sample indices"):
        clf(torch.tensor([0, 8]))
    with pytest.raises(MemprobeError, match="sample indices"):
        clf(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(MemprobeError, match="Llama-style"):
        frozen_prefix(tiny_model("gpt2"), texts, cut=1)


@pytest.mark.slow
def test_experiment_quick_mode(tmp_path):
    cmd = [sys.executable, str(ROOT / "experiments" / "smi_lm.py"), "--quick", "--out", str(tmp_path / "res"),
           "--figures", str(tmp_path / "fig"), "--cache", str(tmp_path / "cache")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((tmp_path / "res" / "smi_lm_quick.json").read_text())["results"]
    ev = res["evaluation_by_ground_truth"]["lira"]
    assert {"early_loss", "early_logit_gap", "psmi[head:taps.norm]", "psmi[frozen:layer0]"} <= set(ev)
    for k, v in ev.items():
        if not k.startswith("_"):
            assert 0.0 <= v["roc_auc"] <= 1.0 and v["roc_auc_ci95"][0] <= v["roc_auc_ci95"][1]
            assert 0.0 < v["average_precision"] <= 1.0
    # the target fits its training lines far better than it predicts held-out ones: it memorizes
    assert res["target"]["train_accuracy_final"] > res["target"]["heldout_accuracy_final_vs_given_labels"] + 0.3
    assert res["shadows"]["mean_in_accuracy"] > res["shadows"]["mean_out_accuracy"] + 0.3
    paired = res["paired_auc_difference_psmi_minus_baseline"]["lira"]["early_loss"]
    assert paired["auc_difference"] == pytest.approx(ev["psmi[head:taps.norm]"]["roc_auc"] - ev["early_loss"]["roc_auc"])
    assert paired["ci95"][0] <= paired["ci95"][1]
    flipped = res["flipped_label_detection_with_ci"]["early_loss"]
    assert len(flipped["average_precision_ci95"]) == 2 and 0.0 <= flipped["roc_auc"] <= 1.0
    assert len(list((tmp_path / "fig").glob("smi_lm_quick_*.png"))) == 4
    # a rerun finds every stage cached (target snapshots, each shadow) and reproduces the result
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    res2 = json.loads((tmp_path / "res" / "smi_lm_quick.json").read_text())["results"]
    assert res2["found_in_cache_at_start"]["shadows"] == 4
    assert res2["evaluation_by_ground_truth"] == res["evaluation_by_ground_truth"]
