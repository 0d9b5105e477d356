"""A failed run says so in its output folder: `FAILED.txt`, the reason in one line.

Every path writes it where the run's folder exists: the ServerApp (`flwr run`, the in-process
run), and `flwr_local.py` (scripts/run.sh) with what it knows besides (the run's status, where
the logs are). What the run wrote before it failed stays beside it (config.json, run.log, the
rounds so far). A run that starts in that folder again clears the marker first, so a folder
holds FAILED.txt exactly when its latest run failed. Standard library only: the `flwr run`
driver imports it before torch.
"""

from __future__ import annotations

from pathlib import Path

FAILED_FILE = "FAILED.txt"


def mark_failed(folder: Path, reason: str) -> Path | None:
    """Write FAILED.txt into `folder` if the folder exists (a run refused before it made one
    leaves nothing behind); returns its path."""
    if not folder.is_dir():
        return None
    path = folder / FAILED_FILE
    path.write_text(" ".join(reason.split()) + "\n")
    return path


def clear_failed(folder: Path) -> None:
    """A new run in `folder`: an earlier run's marker no longer describes it."""
    (folder / FAILED_FILE).unlink(missing_ok=True)
