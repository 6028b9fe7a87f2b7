"""An Optuna search's study (sweeps/hparams_search/, run by ``commands/search.py``), read through
Optuna's public API only (``optuna.load_study``, ``optuna.get_all_study_summaries``,
``Study.get_trials``, ``FrozenTrial.state``): the storage's schema is Optuna's business.

A search's folder holds ``study.json``, which names its study and its storage: by default
``study.db`` beside it (SQLite), or any database URL Optuna takes, written with its password
hidden. A folder with a ``study.db`` and no ``study.json`` is a search of Hydra's Optuna sweeper
(before this version), read as the only study in that file. Optuna is imported only when a study
is read, so composing a search and reporting a grid need neither Optuna nor torch.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lipschitz_lightning.commands.extras import needs

STUDY_FILE = "study.db"  # the default storage, SQLite in the search's folder
RECORD_FILE = "study.json"  # which study a search's folder holds, and where


def default_storage(folder: Path) -> str:
    """``sqlite:///<folder>/study.db`` (SQLite does not make the folder: whoever opens it first does)."""
    return f"sqlite:///{Path(folder).resolve() / STUDY_FILE}"


def shown(storage: str) -> str:
    """A storage URL as it may be written down or printed: its password hidden."""
    try:
        sqlalchemy = needs("sqlalchemy", "reading an Optuna study needs Optuna")  # Optuna's own dependency
        return sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True)
    except Exception:  # not a database URL (Optuna will say so when it opens it)
        return storage


@dataclass(frozen=True)
class StudyRecord:
    """``study.json``: the study a search's folder belongs to."""

    study_name: str
    storage: str  # as written: a password is hidden
    objectives: tuple[str, ...] = ()
    directions: tuple[str, ...] = ()

    def write(self, folder: Path) -> None:
        path = Path(folder) / RECORD_FILE
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps({"study_name": self.study_name, "storage": self.storage,
                                       "objectives": list(self.objectives), "directions": list(self.directions)}, indent=2) + "\n")
        partial.replace(path)


def search_record(folder: Path) -> StudyRecord | None:
    """The study whose trials a folder holds: its ``study.json``, or a ``study.db`` alone (a search
    of Hydra's Optuna sweeper: its one study, name unknown until read); None for any other folder."""
    folder = Path(folder)
    record = folder / RECORD_FILE
    if record.is_file():
        try:
            data = json.loads(record.read_text())
            return StudyRecord(str(data["study_name"]), str(data["storage"]), tuple(data.get("objectives") or ()), tuple(data.get("directions") or ()))
        except (ValueError, KeyError, TypeError):
            return None
    if (folder / STUDY_FILE).is_file():
        return StudyRecord("", f"sqlite:///{(folder / STUDY_FILE).resolve()}")
    return None


def _sqlite_file(storage: str) -> Path | None:
    return Path(storage[len("sqlite:///"):]) if storage.startswith("sqlite:///") else None


def load(storage: str, study_name: str = ""):
    """The study ``study_name`` in ``storage`` (``optuna.load_study``); with no name, the storage's
    only study. Opening a storage never creates it: a missing SQLite file is a ``FileNotFoundError``
    (Optuna would make an empty one)."""
    optuna = needs("optuna", "reading an Optuna study needs Optuna")

    file = _sqlite_file(storage)
    if file is not None and not file.is_file():
        raise FileNotFoundError(f"no study file {file}")
    if not study_name:
        names = [summary.study_name for summary in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        if len(names) != 1:
            raise KeyError(f"{shown(storage)} holds {len(names)} studies ({', '.join(names)}): name one")
        study_name = names[0]
    return optuna.load_study(study_name=study_name, storage=storage)


def trial_states(study) -> dict[str, int]:
    """A study's trials by state: COMPLETE, FAIL, RUNNING (a killed trial stays so), WAITING, PRUNED."""
    return dict(Counter(trial.state.name for trial in study.get_trials(deepcopy=False)))


def completed(study) -> int:
    """How many trials of a study completed (the ones a search's ``trials`` counts)."""
    TrialState = needs("optuna", "reading an Optuna study needs Optuna").trial.TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def trials_left(study, total: int) -> int:
    """How many of a search's ``total`` trials its study still lacks: a failed trial, or one killed
    mid-run (still RUNNING), never completed, so the resumed search runs another in its place."""
    return max(int(total) - completed(study), 0)
