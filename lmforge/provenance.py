"""Where a result came from: git commit, command line and machine, for result JSON files."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

# The checkout lmforge runs from (an editable install); elsewhere git finds no repository.
REPO = Path(__file__).resolve().parents[1]


def git_commit(short: bool = False) -> str:
    """HEAD of lmforge's checkout, marked when the tree has uncommitted changes; "" outside git."""
    try:
        args = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
        head = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        if not head:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + (" (with uncommitted changes)" if dirty else "")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_metadata() -> dict:
    """Command, git commit and machine."""
    prog = Path(sys.argv[0]).name
    return {
        "command": " ".join(["lmforge" if prog == "lmforge" else f"python {sys.argv[0]}"] + sys.argv[1:]),
        "commit": git_commit() or "uncommitted",
        "machine": f"{platform.machine()}, {cpu_count()} CPUs, {platform.system()} {platform.release()}, "
                   f"python {platform.python_version()}",
    }
