import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.cli import main


def test_version_comes_from_the_package_metadata(capsys):
    declared = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"tpgate {declared}\n"


def test_version_needs_no_subcommand_and_no_ray():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "gateway.cli", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("tpgate ")
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "ray" not in imported
