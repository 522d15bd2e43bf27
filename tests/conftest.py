import pytest
import torch

from infgen import InfGen, InfGenConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny() -> InfGen:
    torch.manual_seed(0)
    return InfGen(InfGenConfig.preset("tiny")).eval()


@pytest.fixture(scope="session")
def tiny_global() -> InfGen:
    torch.manual_seed(0)
    return InfGen(InfGenConfig.preset("tiny", attn_window=0)).eval()
