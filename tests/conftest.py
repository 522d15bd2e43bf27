import pytest
import torch

from infgen import InfGen, InfGenConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads fight for the cores and run ~5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny() -> InfGen:
    torch.manual_seed(0)
    return InfGen(InfGenConfig.preset("tiny")).eval()


@pytest.fixture(scope="session")
def tiny_global() -> InfGen:
    torch.manual_seed(0)
    return InfGen(InfGenConfig.preset("tiny", attn_window=0)).eval()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A bundle directory (infgen/ + codec/ + bundle.json) with tiny random weights, like the shipped one."""
    from infgen.autoencoder import AutoencoderConfig, KLAutoencoder
    from infgen.codecs import AutoencoderCodec
    from infgen.pipeline import BundleInfo, InfGenPipeline

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bundle")
    # the InfGen was "trained" on this codec: the same scaling/shift (as `infgen bundle` requires)
    pipe = InfGenPipeline(InfGen(InfGenConfig.preset("tiny", scaling_factor=1.0)),
                          AutoencoderCodec(KLAutoencoder(AutoencoderConfig.preset("tiny"))),
                          BundleInfo(train_latent=8, max_scale=2.0, window_margin=2))
    pipe.save_pretrained(path)
    return path
