"""Ray's messages in the gateway's process go to a file; the terminal keeps only Ray's errors."""

import logging

from gateway.cluster.ray_logs import ray_logs_to


def terminal_handlers(name):
    return [h for h in logging.getLogger(name).handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def test_serve_s_routine_lines_go_to_the_file_and_errors_also_to_the_terminal(tmp_path):
    path = tmp_path / "tpgate.log"
    import ray.serve  # noqa: F401  # sets up the ray.serve logger, as in the gateway

    before = [(h, h.level) for name in ("ray", "ray.serve") for h in terminal_handlers(name)]
    assert before
    with ray_logs_to(path):
        assert all(handler.level == logging.ERROR for handler, _ in before)  # the terminal: errors only
        logging.getLogger("ray.serve").info('Deleting app %s', "['pool-a']")
        logging.getLogger("ray").warning("a warning from Ray")
        logging.getLogger("ray.serve").error("a deploy failed")
    lines = path.read_text().splitlines()
    assert [line.split(" -- ")[1] for line in lines] == ["Deleting app ['pool-a']", "a warning from Ray",
                                                         "a deploy failed"]
    assert " INFO ray.serve " in lines[0]
    assert [(h, h.level) for name in ("ray", "ray.serve") for h in terminal_handlers(name)] == before
    logging.getLogger("ray.serve").info("after the block")
    assert "after the block" not in path.read_text()
