"""A pool replica's health check: level-triggered registration with the controller."""

import pytest

from gateway.cluster.pool_replica import ControllerAway, EngineHealth


class FakeEngine:
    url = "http://127.0.0.1:9001"

    def __init__(self):
        self.answers = True
        self.exit_code = None

    async def healthy(self, session, *, timeout_s):
        return self.answers


class Controller:
    def __init__(self):
        self.calls = []
        self.away = False

    async def register(self, url):
        if self.away:
            raise ControllerAway("restarting")
        self.calls.append(("register", url))

    async def deregister(self, url):
        if self.away:
            raise ControllerAway("restarting")
        self.calls.append(("deregister", url))


@pytest.fixture
def parts():
    engine, controller = FakeEngine(), Controller()
    return engine, controller, EngineHealth(engine, None, register=controller.register,
                                            deregister=controller.deregister)


async def test_every_healthy_check_re_asserts_the_endpoint(parts):
    engine, controller, health = parts
    for _ in range(3):
        await health.check()
    assert controller.calls == [("register", engine.url)] * 3


async def test_an_engine_that_misses_checks_comes_back_by_itself(parts):
    engine, controller, health = parts
    await health.check()
    engine.answers = False  # stopped for a few seconds (a slow machine, a long GC pause)
    with pytest.raises(RuntimeError, match="does not answer /health"):
        await health.check()
    engine.answers = True
    await health.check()
    assert controller.calls == [("register", engine.url), ("deregister", engine.url), ("register", engine.url)]


async def test_an_exited_engine_fails_the_check_with_its_status(parts):
    engine, _controller, health = parts
    engine.answers, engine.exit_code = False, -9
    with pytest.raises(RuntimeError, match="exited with status -9"):
        await health.check()


async def test_an_absent_controller_never_fails_the_check(parts):
    engine, controller, health = parts
    controller.away = True
    await health.check()  # the engine is fine: Serve must not replace the replica
    controller.away = False
    await health.check()
    assert controller.calls == [("register", engine.url)]
