import os

import pytest
import torch

from suprem_net.synthetic import write_raw_dataset
from tests.helpers import tiny_spec

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("SUPREM_compile", "0")  # tests that compile say so; compiling every tiny run costs minutes
# plans assume a throughput instead of timing each test's configuration (a minute for some); the tests of the
# measurement itself (test_calibration.py) unset it
os.environ.setdefault("SUPREM_cpu_gflops", "60")


@pytest.fixture(scope="session", autouse=True)
def _calibration_cache(tmp_path_factory):
    """Measured step times go to a folder of this test session, never to the user's cache (one folder for
    the session: a configuration that several tests plan is timed once)."""
    before = os.environ.get("SUPREM_calibration")
    os.environ["SUPREM_calibration"] = str(tmp_path_factory.mktemp("calibration"))
    yield
    if before is None:
        os.environ.pop("SUPREM_calibration", None)
    else:
        os.environ["SUPREM_calibration"] = before


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
