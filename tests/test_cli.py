import subprocess
import sys

from tcssa.cli import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "tcssa", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout
