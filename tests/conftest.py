import os

import pytest
import torch

from suprem_net.synthetic import write_raw_dataset
from tests.helpers import tiny_spec

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("SUPREM_compile", "0")  # tests that compile say so; compiling every tiny run costs minutes


@pytest.fixture
def tiny_raw(tmp_path):
    """A 3-case synthetic raw dataset Dataset901_SynthAbdomen under tmp_path/raw."""
    folder = write_raw_dataset(tmp_path / "raw", 901, tiny_spec(), num_test=1)
    return folder


@pytest.fixture(scope="module")
def swin():
    """The published Swin UNETR with a 25-class head, seeded (one per test module: tests load weights into it)."""
    from suprem_net.networks import build_network

    torch.manual_seed(0)
    return build_network({"family": "swinunetr", "kwargs": {}}, 1, 25)


@pytest.fixture(scope="module")
def unet():
    """The published SuPreM U-Net with a 25-class head, seeded (one per test module)."""
    from suprem_net.networks import build_network

    torch.manual_seed(0)
    return build_network({"family": "suprem_unet", "kwargs": {}}, 1, 25)


@pytest.fixture(autouse=True)
def _locale_left_alone():
    """No code path may leave the process in another locale (e.g. "C", where Python's default text
    encoding becomes ASCII and later file reads fail in unrelated places)."""
    import locale

    before = locale.setlocale(locale.LC_ALL)
    yield
    after = locale.setlocale(locale.LC_ALL)
    assert after == before, f"the locale changed from {before!r} to {after!r}"
