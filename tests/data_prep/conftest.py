import pytest

from dp_helpers import synth_log


@pytest.fixture
def synth_path(tmp_path):
    p = tmp_path / "log.csv"
    synth_log().to_csv(p, index=False)
    return p
