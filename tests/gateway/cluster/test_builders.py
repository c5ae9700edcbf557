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


def configured(tmp_path, engine_host=None):
    from gateway.config import load_config

    path = tmp_path / "tpgate.yaml"
    host = "" if engine_host is None else f"engine: {{host: '{engine_host}'}}\n"
    path.write_text(host + f"auth: {{engine_key_file: {tmp_path / 'keys' / 'engine-key'}}}\n")
    return load_config(path)


def test_on_one_node_engines_listen_on_loopback_and_need_no_key(tmp_path):
    from gateway.cluster.lifecycle import capacity_of

    config = configured(tmp_path)
    deployer = builders.pool_deployer(config)
    assert (deployer.engine_host, deployer.engine_key_seed) == ("127.0.0.1", None)
    assert builders.controller_settings(config, capacity_of(config)).engine_key_seed is None
    assert not (tmp_path / "keys").exists()


def test_beyond_loopback_each_pool_gets_a_key_of_its_own_from_a_private_seed(tmp_path, monkeypatch):
    from gateway.cluster.lifecycle import capacity_of
    from gateway.dataplane.auth import engine_key

    config = configured(tmp_path, "auto")
    deployer = builders.pool_deployer(config)
    seed_file = tmp_path / "keys" / "engine-key"
    assert deployer.engine_host == "auto" and deployer.engine_key_seed == seed_file.read_text().strip()
    assert seed_file.stat().st_mode & 0o077 == 0  # private to the user
    assert "engine_key_seed" not in repr(deployer) and deployer.engine_key_seed not in repr(deployer)
    settings = builders.controller_settings(config, capacity_of(config))
    assert settings.engine_key_seed == deployer.engine_key_seed  # the same keys on the routers' side
    (tmp_path / "one").mkdir()
    on_one_node = builders.controller_settings(configured(tmp_path / "one"), capacity_of(config))
    assert on_one_node.digest != settings.digest  # a controller made without the seed is not reused with it
    assert builders.pool_deployer(config).engine_key_seed == deployer.engine_key_seed  # stable across restarts
    keys = {engine_key(deployer.engine_key_seed, pool) for pool in ("a", "b")}
    assert len(keys) == 2 and all(len(k) == 64 for k in keys)
    bound = []
    monkeypatch.setattr(builders.serve, "_run", lambda app, **kwargs: bound.append(app))
    deployer.deploy(make_pool("a"))
    kwargs = bound[0]._bound_deployment.init_kwargs
    assert kwargs["host"] == "auto" and kwargs["api_key"] == engine_key(deployer.engine_key_seed, "a")
