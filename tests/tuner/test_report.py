import re
import shutil
import subprocess

import pytest
from plotly.offline import get_plotlyjs

from gateway.errors import UserError
from tests.tuner.conftest import config_with
from tests.tuner.fakes import ScriptedRunner
from tests.tuner.test_study import WORKLOAD, setup
from tuner.replay import Deviation, SyntheticRunner
from tuner.report import load_report, render_report, write_report
from tuner.space import build_space


async def study_in(tmp_path, config=None, n_trials=5, name="s"):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    driver, *_ = setup(config, storage=storage, n_trials=n_trials, study_name=name)
    await driver.run()
    return storage


def plots_in(page: str) -> int:
    return page.count('class="plotly-graph-div"')


async def test_the_report_is_one_self_contained_page(tmp_path):
    storage = await study_in(tmp_path)
    report = load_report(storage)
    page = render_report(report)
    assert plots_in(page) == 4  # history, objective by configuration, predicted vs measured, SLOs
    plotly_js = get_plotlyjs()
    assert plotly_js in page and "Plotly.newPlot" in page  # plotly.js is inside the page
    ours = page.replace(plotly_js, "")
    assert "<script src" not in ours and not re.search(r"""(src|href)=["']?(https?:)?//""", ours)
    measured = report.measured()
    assert measured and page.count("<tr>") >= len(measured) + 1
    for record in measured:
        assert record.candidate.label() in page
    assert "GiB" in page and "winner" in page


async def test_several_objectives_report_a_pareto_front(tmp_path):
    config = config_with(gpus=8, classes={"batch": {"objective": ["max_output_tokens_per_s", "min_e2e_p99"],
                                                    "profile": "batch"}}, default_class="batch")
    page = render_report(load_report(await study_in(tmp_path, config)))
    assert "Pareto front" in page and plots_in(page) == 5  # 2 histories, Pareto, 2 predicted vs measured


def test_a_storage_that_cannot_be_opened_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot open storage 'sqlite:////nonexistent/x.db'"):
        load_report("sqlite:////nonexistent/x.db")


async def test_a_missing_study_is_named(tmp_path):
    storage = await study_in(tmp_path, name="one")
    with pytest.raises(UserError, match="no study 'two' in .* \\(studies: one\\)"):
        load_report(storage, "two")
    await study_in(tmp_path, name="other")
    with pytest.raises(UserError, match="holds 2 studies; name one with --study-name"):
        load_report(storage)


@pytest.mark.integration
async def test_the_report_draws_its_plots_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium")
    assert chromium is not None, "Debian's chromium is needed: apt-get install -y chromium"
    storage = await study_in(tmp_path)
    out = tmp_path / "report.html"
    report = write_report(storage, None, str(out))
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", out.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert dom.count('class="plotly-graph-div') == 4
    assert dom.count('class="main-svg"') >= 2 * 4  # plotly draws two SVG layers per plot it drew
    points = dom.count('class="point"')  # one path per marker and per bar
    assert points >= len(report.measured())


async def test_the_report_shows_re_measurement_parallel_rounds_and_avoided_configurations(tmp_path):
    batch = {"objective": "max_output_tokens_per_s", "profile": "batch", "gpu_budget": 8,
             "slo": {"ttft_p99_s": 5.0, "error_rate_max": 0.001}}
    config = config_with(gpus=8, classes={"batch": batch}, default_class="batch",
                         tuning={"parallel_trials": 2, "remeasure_runs": 1, "max_failure_probability": 0.2})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    space = build_space(config, "batch")
    runner = ScriptedRunner(SyntheticRunner(space, WORKLOAD, Deviation(noise=0.05), seed=2),
                            fail={space.tp_sizes[-1]: "engine exited: CUDA out of memory"})
    driver, *_ = setup(config, storage=storage, n_trials=10, runner=runner)
    study = driver.open_study()
    small = [c for c in space.candidates() if c.gpus <= 4][:2]  # the first round measures these two at once
    for candidate in small:
        study.enqueue_trial(candidate.params())
    result = await driver.run()
    report = load_report(storage)
    page = render_report(report)
    assert report.runs_required == 2 and "ranked by the worst of 2 runs" in page
    twice = [s for s in report.remeasured() if s.startswith(result.best[0].candidate.label())]
    assert twice and "(worst " in twice[0]
    assert [r.parallel_round for r in result.records[:2]] == [1, 1]
    assert report.rounds().endswith("up to 2 at once") and report.rounds() in page
    avoided = [r for r in result.records if r.outcome == "avoided"]
    assert report.avoided() == [f"#{r.number} {r.candidate.label()}: {r.reason}" for r in avoided]
    assert all(line in page for line in report.avoided())
