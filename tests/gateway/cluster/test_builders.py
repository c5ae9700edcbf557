"""The Serve pool deployer: deploys from several threads of one process take turns (building a Serve deployment
registers and unregisters a module in cloudpickle's process-wide set; two at once fail one of them)."""

import threading
import time

from gateway.cluster import builders
from tests.gateway.pools import make_pool


def test_deploys_from_several_threads_take_turns(monkeypatch):
    inside, most, built = 0, 0, []
    count = threading.Lock()

    def slow_run(app, *, name, **kwargs):  # stands in for Serve's controller, which a unit test has not
        nonlocal inside, most
        with count:
            inside += 1
            most = max(most, inside)
        time.sleep(0.05)
        with count:
            inside -= 1
            built.append(name)

    monkeypatch.setattr(builders.serve, "_run", slow_run)
    deployer = builders.ServePoolDeployer(startup_timeout_s=60, stop_timeout_s=5, health_check_period_s=1)
    threads = [threading.Thread(target=deployer.deploy, args=(make_pool(f"p{i}"),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(built) == ["pool-p0", "pool-p1", "pool-p2", "pool-p3"]  # every deploy was built and run
    assert most == 1
