import torch

from memprobe import token_stats
from memprobe.token_stats import next_token_stats


def test_stats_match_float64_definitions_across_chunks(monkeypatch):
    monkeypatch.setattr(token_stats, "CHUNK", 7)  # several chunks, a ragged last one
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 11, 50, generator=g) * 3
    targets = torch.randint(0, 50, (2, 11), generator=g)
    s = next_token_stats(logits, targets)
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sigma = ((p * (logp - mu[..., None]) ** 2).sum(-1)).sqrt()
    assert torch.allclose(s.target_logprob.double(), logp.gather(-1, targets[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(s.entropy.double(), -mu, atol=1e-5)
    assert torch.allclose(s.logprob_std.double(), sigma, atol=1e-4)
    assert torch.equal(s.correct, logits.argmax(-1) == targets)
    assert torch.allclose(s.top_logprob.double(), logp.max(-1).values, atol=1e-5)


def test_shape_mismatch_is_refused():
    try:
        next_token_stats(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))
    except ValueError as exc:
        assert "do not match" in str(exc)
    else:
        raise AssertionError("mismatched shapes were accepted")
