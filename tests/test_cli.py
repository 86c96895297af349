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


def test_the_help_of_every_command_loads_no_torch():
    """`tcssa --help` and each command's help stay fast: the flags come from torch-free config modules,
    the handlers import the library only when they run."""
    check = (
        "import sys\n"
        "from tcssa.cli import build_parser\n"
        "def helps(parser):\n"
        "    yield parser.format_help()\n"
        "    for group in parser._subparsers._group_actions if parser._subparsers else ():\n"
        "        for sub in group.choices.values():\n"
        "            yield from helps(sub)\n"
        "texts = list(helps(build_parser()))\n"
        "assert len(texts) > 15, len(texts)\n"
        "loaded = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
