import pytest
import torch

from gemma_opt.models import load_model


@pytest.fixture
def gemma_270m():
    """A fresh copy of the real Gemma 3 270M (tests modify it in place)."""
    return load_model("gemma-3-270m")


@pytest.fixture
def tiny():
    return load_model("tiny-random")


def snapshot(model: torch.nn.Module, keep) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if keep(n)}
