"""`ctrak --help` and every subcommand's `--help` answer without importing torch, Ray or
diffusers (heavy imports happen inside each job's `run`), in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

from jobs.cli import JOB_MODULES

HEAVY = ("torch", "ray", "diffusers")
PROBE = f"""
import contextlib, io, json, sys
from jobs.cli import main
cmd = sys.argv[1:]
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main([*cmd, "--help"])
        code = None
    except SystemExit as exit:
        code = exit.code
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(json.dumps({{"code": code, "usage": "usage:" in out.getvalue(), "heavy": heavy}}))
"""


def _help(*cmd: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *cmd], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_imports_no_heavy_library():
    from jobs.cli import build_parser

    parser = build_parser()
    commands = sorted(parser._subparsers._group_actions[0].choices)  # every registered one
    assert len(commands) == len(JOB_MODULES)
    for cmd in [(), *((c,) for c in commands)]:
        result = _help(*cmd)
        assert result == {"code": 0, "usage": True, "heavy": []}, (cmd, result)
