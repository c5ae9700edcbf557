import subprocess
import sys

import pytest

from gateway.cli import main
from tests.tuner.test_report import study_in


@pytest.mark.parametrize(("argv", "message"), [
    (["tune"], "tpgate tune: --class is required (or use `tpgate tune report`)"),
    (["tune", "--class", "realtime"], "unknown class 'realtime' (classes: interactive, batch)"),
    (["tune", "--class", "batch", "--trials", "0"], "--trials must be at least 1, not 0"),
    (["tune", "--class", "batch", "--timeout", "soon"], "--timeout 'soon': expected seconds or a duration"),
    (["tune", "report", "--out", "x.html"], "the following arguments are required: --storage"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


async def test_report_verb_writes_the_page(tmp_path, capsys):
    storage = await study_in(tmp_path)
    out = tmp_path / "report.html"
    assert main(["tune", "report", "--storage", storage, "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert f"wrote {out}:" in capsys.readouterr().out
    assert main(["tune", "report", "--storage", storage, "--study-name", "nope", "--out", str(out)]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


@pytest.mark.integration
def test_the_gateway_cli_does_not_import_the_tuner_until_a_study_runs():
    code = ("import sys, gateway.cli; gateway.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m == 'tuner' or m.startswith(('tuner.', 'plotly', 'optuna'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
