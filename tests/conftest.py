import pytest

from gemma_opt.models import load_model


@pytest.fixture
def tiny():
    """A fresh tiny random Gemma3ForConditionalGeneration (tests modify it in place)."""
    return load_model("tiny-random")
