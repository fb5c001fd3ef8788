import pytest
import torch
from interrupt import Interrupted, stop_after

from memprobe.capture import capture_outputs
from memprobe.errors import MemprobeError
from memprobe.train.classifier import TrainConfig, load_weights, mlp, small_cnn, train_classifier


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(100, 6, generator=g), torch.randint(0, 3, (100,), generator=g)


def test_resume_gives_the_uninterrupted_result(tmp_path):
    torch.set_num_threads(1)
    x, y = data()
    cfg = TrainConfig(epochs=4, batch_size=16, eval_every=3, seed=1)  # 7 steps/epoch: snapshots mid-epoch
    torch.manual_seed(0)
    straight = mlp(6, (8,), 3)
    full = train_classifier(straight, x, y, cfg, checkpoint_dir=tmp_path / "a")
    torch.manual_seed(0)
    broken = stop_after(mlp(6, (8,), 3), 17)
    with pytest.raises(Interrupted):
        train_classifier(broken, x, y, cfg, checkpoint_dir=tmp_path / "b")
    torch.manual_seed(123)  # different init: resume must load the saved weights
    resumed_model = mlp(6, (8,), 3)
    resumed = train_classifier(resumed_model, x, y, cfg, checkpoint_dir=tmp_path / "b", keep_weights=True)
    assert resumed.steps == full.steps
    for a, b in zip(full.losses, resumed.losses, strict=True):
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b))
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[k], v)
    assert len(resumed.weights) == len(resumed.steps)
    reloaded = load_weights(mlp(6, (8,), 3), tmp_path / "b" / f"step{full.steps[-1]}.safetensors")
    torch.testing.assert_close(reloaded(x), straight(x))
    with pytest.raises(MemprobeError, match="different config"):
        train_classifier(mlp(6, (8,), 3), x, y, TrainConfig(epochs=5), checkpoint_dir=tmp_path / "b")


def test_history_and_early_index():
    x, _ = data()
    y = x[:, :3].argmax(1)  # learnable labels
    hist = train_classifier(mlp(6, (32,), 3), x, y, TrainConfig(epochs=60, batch_size=25, lr=1e-2, eval_every=4))
    med = hist.median_loss()
    assert hist.steps[0] == 0 and hist.steps[-1] == 240
    i = hist.early_index(0.05)
    assert med[i] <= 0.05 * med[0] and (i == 0 or med[i - 1] > 0.05 * med[0])
    assert hist.early_index(1e-12) == len(med) - 1  # never reached: the last snapshot


def test_cnn_and_hidden_capture():
    x = torch.rand(10, 1, 12, 12)
    model = small_cnn(1, 4, width=4)
    feats = capture_outputs(model, x, ["act0", "act2"])
    assert feats["act0"].shape == (10, 4 * 12 * 12) and feats["act2"].shape == (10, 8)
    with pytest.raises(MemprobeError, match="same length"):
        train_classifier(model, x, torch.zeros(3, dtype=torch.long), TrainConfig())
