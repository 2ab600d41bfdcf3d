"""The CLI under a fresh wrapper process that measures the engram process's peak RSS
(`RUSAGE_CHILDREN`): what the memory-bound tests compare against a baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TIMEOUT = 300  # seconds: start-up alone takes several on a loaded machine; no case may need more

MEASURE = """
import json, resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "peak": peak}))
"""


def run_measured(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, int]:
    """The CLI under a fresh wrapper process: its result and the engram process's peak RSS."""
    env = {**os.environ, "COLUMNS": "200"}
    wrapper = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, "-m", "engram_cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=TIMEOUT,
        check=True,
    )
    out = json.loads(wrapper.stdout)
    proc = subprocess.CompletedProcess(args, out["returncode"], out["stdout"], out["stderr"])
    return proc, out["peak"]
