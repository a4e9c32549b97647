"""`cura ui` without its extra: one sentence saying how to install it (runs with or without fastapi)."""

from __future__ import annotations

import sys

from cura.cli import main


def test_ui_without_the_extra_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now fails as if not installed
    assert main(["ui", "--workspace", "."]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cura ui needs the 'uvicorn' package") and "pip install 'cura[ui]'" in err
    assert "\n" not in err and "Traceback" not in err
