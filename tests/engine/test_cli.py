"""rednet.engine's one door for the tools (rednet.engine.cli): what it exports, the errors that end a command
and their exit codes, and the README's table of them."""
from __future__ import annotations

import pytest

from ..helpers import ROOT


def test_engine_exports_what_the_tools_import():
    import rednet.engine

    for name in rednet.engine.__all__:
        assert getattr(rednet.engine, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'fitt'"):
        rednet.engine.fitt


def test_the_tools_come_through_one_door():
    """The tools (``rednet/tools``, and the developer tools left in ``tools/``) import from ``rednet.engine``
    itself, never its modules; it exports exactly what they import, and the errors of the exit-code table (with
    the table)."""
    import ast

    import rednet.engine

    imported = set()
    for path in sorted([*(ROOT / "rednet" / "tools").glob("*.py"), *(ROOT / "tools").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [m for m in modules if m.startswith("rednet.engine.")], f"{path.name} imports {modules}"
            if isinstance(node, ast.ImportFrom) and node.module == "rednet.engine":
                imported |= {a.name for a in node.names}
    errors = {row.error.__name__ for row in rednet.engine.EXIT_CODES if row.error is not KeyboardInterrupt}
    assert sorted(rednet.engine.__all__) == sorted(imported | errors | {"EXIT_CODES"})


def test_run_command_ends_each_error_with_its_exit_status(capsys, caplog, monkeypatch):
    import logging
    import signal

    from rednet.engine import EXIT_CODES, NonFiniteLossError, TrainingInterrupted, run_command

    # A tool run earlier in this process left its handler on a stdout that pytest has since closed.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if type(h) is not logging.StreamHandler])

    def raising(error: BaseException):
        def command() -> int:
            raise error
        return command

    for row in EXIT_CODES:
        if row.error is TrainingInterrupted:
            assert run_command(raising(TrainingInterrupted(signal.SIGTERM, None))) == 128 + signal.SIGTERM
            assert "stopped by SIGTERM" in caplog.text
        elif row.error is KeyboardInterrupt:
            assert run_command(raising(KeyboardInterrupt()), interrupted="stopped; nothing written") == 130
            assert capsys.readouterr().err == "stopped; nothing written\n"
        elif row.error is NonFiniteLossError:  # logged, with the run's other lines
            assert run_command(raising(NonFiniteLossError("loss nan at iteration 7"))) == 3
            assert "error: loss nan at iteration 7" in caplog.text
        else:
            code = run_command(raising(row.error("what to fix:\n  the details")))
            assert (code, capsys.readouterr().err) == (row.code, "error: what to fix: the details\n")
    assert run_command(lambda: 0) == 0
    with pytest.raises(ZeroDivisionError):  # a bug is not bad input: it keeps its traceback
        run_command(lambda: 1 // 0)


def test_the_readme_quotes_the_exit_codes():
    from rednet.engine import EXIT_CODES, TrainingInterrupted

    section = (ROOT / "README.md").read_text().split("\n## Exit codes\n")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    assert rows == [f"| {'128 + N' if row.error is TrainingInterrupted else row.code} | `{row.error.__name__}` | "
                    f"{row.meaning} |" for row in EXIT_CODES]
