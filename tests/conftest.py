import os

import pytest

from suprem_net.synthetic import SyntheticSpec, write_raw_dataset

os.environ.setdefault("OMP_NUM_THREADS", "2")


def tiny_spec(**kw) -> SyntheticSpec:
    base = dict(num_cases=3, num_classes=3, fov_mm=(60.0, 96.0, 96.0), inplane_spacing=(2.0, 3.0),
                z_spacing=(3.0, 5.0), seed=1)
    base.update(kw)
    return SyntheticSpec(**base)


@pytest.fixture
def tiny_raw(tmp_path):
    """A 3-case synthetic raw dataset Dataset901_SynthAbdomen under tmp_path/raw."""
    folder = write_raw_dataset(tmp_path / "raw", 901, tiny_spec(), num_test=1)
    return folder
