"""An Optuna search's study on disk (sweeps/hparams_search/): SQLite in the search's folder, read
with the standard library, so composing a search and reporting one need neither Optuna nor torch."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

STUDY_FILE = "study.db"


def study_storage(sweep_dir: str) -> str:
    """``sqlite:///<sweep dir>/study.db``, the folder created: Optuna's sweeper opens its storage
    before any job has made the sweep's folder, and SQLite does not make folders."""
    folder = Path(sweep_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / STUDY_FILE}"


def trial_states(database: Path) -> dict[str, int] | None:
    """A study's trials by state (Optuna's schema: ``trials.state``, e.g. COMPLETE, FAIL, RUNNING);
    None for a file that holds no study."""
    with contextlib.closing(sqlite3.connect(database)) as connection:
        try:
            rows = connection.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall()
        except sqlite3.DatabaseError:
            return None
    return {str(state): int(count) for state, count in rows}


def trials_left(sweep_dir: str, total: int) -> int:
    """How many of a search's ``total`` trials its study still lacks: all in a new study; a trial
    killed mid-run never completed, so the resumed search runs it again."""
    database = Path(sweep_dir) / STUDY_FILE
    states = trial_states(database) if database.is_file() else None
    if states is None:
        return int(total)  # no study yet (or a foreign file: Optuna will say what is wrong with it)
    return max(int(total) - states.get("COMPLETE", 0), 0)
