import pytest

from gateway.config import SloConfig, WorkloadClassConfig
from gateway.errors import UserError
from tests.tuner.conftest import config_with
from tuner.objectives import (
    MissingFigure,
    constraint_values,
    objective_specs,
    objective_values,
    pareto_front,
    pessimistic_values,
    slo_names,
    slo_results,
)

SLO = SloConfig(ttft_p99_s=0.5, tpot_p99_s=0.04, error_rate_max=0.001)


def test_a_class_objective_is_one_name_or_a_list():
    assert WorkloadClassConfig(objective="max_goodput").objectives == ("max_goodput",)
    both = WorkloadClassConfig(objective=["max_goodput", "min_e2e_p99"])
    assert both.objectives == ("max_goodput", "min_e2e_p99")
    with pytest.raises(UserError, match="classes.a.objective must name one objective or a list of distinct ones"):
        config_with(classes={"a": {"objective": ["max_goodput", "max_goodput"]}}, default_class="a")
    with pytest.raises(UserError, match="classes.a.objective"):
        config_with(classes={"a": {"objective": "min_ttft"}}, default_class="a")


def test_objective_values_and_directions():
    specs = objective_specs(["min_e2e_p99", "max_output_tokens_per_s", "max_goodput"])
    assert [s.direction for s in specs] == ["minimize", "maximize", "maximize"]
    figures = {"e2e_p99_s": 2.5, "output_tokens_per_s": 900.0, "goodput_requests_per_s": 3.0}
    assert objective_values(specs, figures) == [2.5, 900.0, 3.0]
    with pytest.raises(MissingFigure, match="goodput"):
        objective_values(specs, {**figures, "goodput_requests_per_s": None})
    assert pessimistic_values(specs, worst_latency_s=60.0) == [60.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="unknown objective"):
        objective_specs(["max_fun"])


def test_slo_constraints_are_relative_and_nonpositive_when_met():
    results = {r.name: r for r in slo_results(SLO, {"ttft_p99_s": 0.6, "tpot_p99_s": 0.02, "error_rate": 0.0})}
    assert list(results) == ["ttft_p99_s", "tpot_p99_s", "error_rate_max"]
    assert results["ttft_p99_s"].constraint == pytest.approx(0.2) and not results["ttft_p99_s"].met
    assert results["tpot_p99_s"].constraint == pytest.approx(-0.5) and results["tpot_p99_s"].met
    assert results["error_rate_max"].constraint == pytest.approx(-1.0) and results["error_rate_max"].met


def test_error_rate_limit_of_zero_uses_a_floor():
    (result,) = slo_results(SloConfig(error_rate_max=0.0), {"error_rate": 0.002})
    assert result.constraint == pytest.approx(2.0) and not result.met
    (result,) = slo_results(SloConfig(error_rate_max=0.0), {"error_rate": 0.0})
    assert result.constraint == 0.0 and result.met


def test_an_unmeasured_figure_breaks_its_slo():
    (result,) = slo_results(SloConfig(tpot_p99_s=0.04), {"tpot_p99_s": None})
    assert (result.met, result.constraint, result.measured) == (False, 1.0, None)


def test_constraint_vector_starts_with_deployed():
    results = slo_results(SLO, {"ttft_p99_s": 0.25, "tpot_p99_s": 0.05, "error_rate": 0.0})
    assert constraint_values(results, slo=SLO) == pytest.approx([0.0, -0.5, 0.25, -1.0])
    assert constraint_values(None, slo=SLO) == [1.0, 0.0, 0.0, 0.0]
    assert slo_names(SloConfig()) == [] and constraint_values(None, slo=SloConfig()) == [1.0]


def test_pareto_front_keeps_the_non_dominated():
    specs = objective_specs(["max_goodput", "min_e2e_p99"])
    points = [(10.0, 2.0), (12.0, 3.0), (9.0, 2.5), (12.0, 3.0), (8.0, 1.5)]
    assert pareto_front(points, specs) == [0, 1, 3, 4]  # (9, 2.5) is dominated by (10, 2); equal points both stay
