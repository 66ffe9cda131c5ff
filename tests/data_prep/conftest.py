import pytest

from dp_helpers import synth_log


@pytest.fixture
def synth_path(tmp_path):
    p = tmp_path / "log.csv"
    synth_log().to_csv(p, index=False)
    return p


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray (2 CPUs) for the tests of one module, shut down after them."""
    ray = pytest.importorskip("ray")
    from ray.data import DataContext

    from conrec_verl.runtime.loopback import ray_on_loopback

    if ray.is_initialized():
        ray.shutdown()
    with ray_on_loopback():  # a fresh Ray of its own, never a cluster already running on the machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    yield ray
    ctx.enable_progress_bars, ctx.print_on_execution_start = saved
    ray.shutdown()


