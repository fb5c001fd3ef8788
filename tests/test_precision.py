import pytest
import torch

from memprobe.errors import MemprobeError
from memprobe.models import tiny_model
from memprobe.precision import compute_precision, native_bfloat16, resolve_precision


def test_bfloat16_runs_the_blocks_in_bfloat16_and_the_head_in_float32():
    loaded = tiny_model("llama", d_model=128, seed=0)
    model, ids = loaded.model, torch.tensor([loaded.encode("The quick brown fox jumps over the lazy dog.")])
    seen = {}
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.update(mlp=o.dtype))
    with torch.inference_mode():
        exact = model(input_ids=ids).logits
        with compute_precision("bfloat16", model) as used:
            fast = model(input_ids=ids).logits
    hook.remove()
    assert used == "bfloat16" and seen["mlp"] == torch.bfloat16 and fast.dtype == torch.float32
    assert not torch.equal(fast, exact) and torch.allclose(fast, exact, atol=0.1)
    assert "forward" not in model.get_output_embeddings().__dict__  # the head is itself again
    with torch.inference_mode(), compute_precision("float32", model) as used:
        assert used == "float32" and torch.equal(model(input_ids=ids).logits, exact)


def test_auto_follows_the_hardware_and_a_bad_name_is_refused():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bfloat16" if native_bfloat16(cpu) else "float32")
    with pytest.raises(MemprobeError, match="not one of auto, float32, bfloat16"):
        resolve_precision("fp8", cpu)
