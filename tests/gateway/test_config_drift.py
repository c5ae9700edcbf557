"""The ``drift`` section of the configuration."""

import pytest

from gateway.config import load_config
from gateway.errors import UserError


def test_drift_is_off_for_every_class_by_default():
    config = load_config()
    assert config.drift.classes == {} and config.drift.interval_s == 30


def test_a_watched_class_takes_the_defaults_it_does_not_set(tmp_path):
    path = tmp_path / "tpgate.yaml"
    path.write_text("drift:\n  classes:\n    batch: {mode: advisory, concurrency_ratio: 8, max_gpus: 4}\n")
    batch = load_config(path).drift.classes["batch"]
    assert (batch.mode, batch.concurrency_ratio, batch.max_gpus) == ("advisory", 8, 4)
    assert (batch.prompt_median_ratio, batch.window_s, batch.sustained_share) == (2, 600, 1.0)


@pytest.mark.parametrize(("text", "message"), [
    ("drift: {classes: {nightly: {}}}\n", "drift.classes names unknown classes ['nightly']"),
    ("drift: {interval_s: 60, classes: {batch: {window_s: 30}}}\n",
     "drift.classes.batch.window_s (30) is shorter than drift.interval_s (60)"),
    ("drift: {classes: {batch: {mode: sometimes}}}\n", "drift.classes.batch.mode"),
    ("drift: {classes: {batch: {concurrency_ratio: 1}}}\n", "drift.classes.batch.concurrency_ratio"),
    ("drift: {classes: {batch: {sustained_share: 0.4}}}\n", "drift.classes.batch.sustained_share"),
])
def test_bad_drift_settings_are_named(tmp_path, text, message):
    path = tmp_path / "tpgate.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(path)
