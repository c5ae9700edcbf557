import yaml

from gateway.config import load_config
from gateway.planner import EngineKnobs
from tests.tuner.conftest import config_with
from tuner.space import Candidate
from tuner.winner import winner_config, winner_yaml

WINNER = Candidate(2, 2, EngineKnobs.of(max_batch_size=256, cache_max_entry_count=0.9, max_prefill_token_num=8192))


def test_the_winner_is_a_configuration_tpgate_serve_accepts(tmp_path):
    config = config_with(gpus=8, engine={"time_scale": 10})
    path = tmp_path / "best.yaml"
    path.write_text(winner_yaml(config, "batch", WINNER, study_name="batch-1234abcd"))
    served = load_config(path)
    assert served.routes["batch"] == {"batch-tp2x2": 1.0}
    pool = served.pools["batch-tp2x2"]
    assert (pool.tp, pool.replicas, pool.knobs.max_batch_size, pool.knobs.cache_max_entry_count) == (2, 2, 256, 0.9)
    assert served.routes["interactive"] == {"interactive-tp4": 1.0}  # the planner's default stays
    assert served.pools["interactive-tp4"].tp == 4
    assert (served.model, served.gpus, served.engine.time_scale) == (config.model, 8, 10)
    assert path.read_text().startswith("# tpgate tune: the winner of study 'batch-1234abcd' for class 'batch'")


def test_configured_pools_of_other_classes_are_kept_and_the_old_one_dropped(tmp_path):
    config = config_with(gpus=8, pools={"shared": {"tp": 2, "replicas": 1}, "old-batch": {"tp": 4}},
                         routes={"interactive": {"shared": 1.0}, "batch": {"old-batch": 0.5, "shared": 0.5}})
    data = winner_config(config, "batch", Candidate(2, 1, WINNER.knobs))
    assert set(data["pools"]) == {"shared", "batch-tp2x1"}
    assert data["routes"] == {"interactive": {"shared": 1.0}, "batch": {"batch-tp2x1": 1.0}}
    assert "auth" not in data and "tuning" not in data
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).pools["batch-tp2x1"].knobs.max_prefill_token_num == 8192
