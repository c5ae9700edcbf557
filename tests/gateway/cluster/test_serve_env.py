"""Serve's request-path settings of the router replicas, and the rules HAProxy's front applies."""

from gateway.cluster.serve_env import (
    ROUTER_SERVE_ENV,
    SEPARATE_THREAD,
    SKIP_DISCONNECT_WATCH,
    front_rules,
    router_env_vars,
    skip_disconnect_watch,
)


def test_tpgates_values_apply_unless_the_operator_set_their_own():
    assert router_env_vars({}) == ROUTER_SERVE_ENV
    assert ROUTER_SERVE_ENV[SEPARATE_THREAD] == "0"
    chosen = router_env_vars({"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1", "UNRELATED": "x"})
    assert chosen["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] == "1" and "UNRELATED" not in chosen


def test_serves_disconnect_watcher_is_skipped_only_when_the_router_runs_on_the_replicas_loop():
    assert skip_disconnect_watch({}, router_env_vars({}))
    separate = {SEPARATE_THREAD: "1"}
    assert not skip_disconnect_watch(separate, router_env_vars(separate))  # Serve's watcher carries receive across
    assert not skip_disconnect_watch({SKIP_DISCONNECT_WATCH: "0"}, router_env_vars({}))


def test_the_front_stamps_every_request_and_marks_it_when_the_watcher_is_skipped():
    rules = front_rules({})
    assert rules == ["http-request set-header x-tpgate-front-received-us %[date(0,us)]",
                     "http-request set-header x-request-disconnect-disabled ?1"]
    assert front_rules({SEPARATE_THREAD: "1"}) == rules[:1]
