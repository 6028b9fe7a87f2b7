"""An Optuna search of one [optimizer, constraint] pair: ``python train.py +hparams_search=<pair>``.

A Hydra sweeper (``hydra_plugins/lipschitz_lightning_search``, chosen by ``sweeps/hparams_search/``'s
``override /hydra/sweeper: optuna_search``): every trial is a job of ``train.py``'s ``@hydra.main`` app,
launched by Hydra's launcher, exactly as a single run or a grid's job runs. Why not Hydra's own
Optuna sweeper: ``hydra-optuna-sweeper`` is unmaintained and pins optuna < 3 (SQLAlchemy < 2,
alembic < 1.14) while Optuna is at 4 and 5. This module drives Optuna's ask-and-tell API itself,
from the ``search:`` section of ``sweeps/hparams_search/*.yaml`` (``SearchSettings``), with what the
sweeper did and no more:

- the base config (``conf/train.yaml`` with the command line) composed and checked once, the
  search space's keys and the data too, before the study is opened: a mistake is one line, not
  forty failed trials;
- the study: ``search.storage``, by default ``sqlite:///<search.dir>/study.db``, any database URL
  Optuna takes to share one study between machines; its name, directions and objectives checked
  against the file's (``study.json`` beside the trials says which study they belong to);
- for each trial the study lacks (``search.trials`` counts completed trials, so running the same
  command again resumes the study): ask the study for a point of the space, launch the trial with
  those overrides in its own run directory ``<search.dir>/trial-<number>/`` (``summary.json``,
  ``train.log``, ``.hydra/``, checkpoints: what a run of a grid leaves), tell the study the
  objectives the job returns (``optimized_metrics``: ``search.objectives``);
- a trial that fails (diverges, a setting out of range, an objective missing) is told FAIL with
  its one-line error and the search goes on, until more than ``search.max_failure_rate`` of the
  trials it was to run have failed; a SIGTERM or Ctrl-C tells the running trial FAIL and stops;
- trials run one after another in this process: a trainer on several devices (``trainer=ddp``) is
  refused, since Lightning's DDP launcher would start the whole search again on every rank.

The sampler is built for each trial with ``seed + <trial number>`` (NSGA-II keeps its population
in the study, not in the sampler): a resumed search draws what an unbroken one would have drawn,
where the sweeper's one seeded sampler per invocation drew the first trials again.
"""

from __future__ import annotations

import json
import logging
import logging.config
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
from omegaconf import DictConfig, OmegaConf, open_dict
from pydantic import ConfigDict, Field

from lipschitz_lightning import CONF_DIR
from lipschitz_lightning.commands import studies
from lipschitz_lightning.commands.extras import needs
from lipschitz_lightning.config.settings import (
    OBJECTIVES,
    PositiveInt,
    Settings,
    check_train_settings,
    validate_settings,
)
from lipschitz_lightning.errors import (
    ConfigError,
    LipschitzLightningError,
    Preempted,
    exit_with,
    one_line,
)

log = logging.getLogger("lipschitz_lightning")

REQUEST = "hparams_search"  # the config group whose choice makes train.py run a search
MULTIRUN_FLAGS = ("-m", "--multirun")  # a search is a multirun already: the flag changes nothing
SPACE_SYNTAX = "choice(a, b, ...), interval(low, high), range(start, stop[, step]), each optionally in tag(log, ...)"


# ----------------------------------------------------------------------------- the search: section


class SamplerSettings(Settings):
    """An Optuna sampler: its class under ``optuna.samplers`` and its arguments."""

    model_config = ConfigDict(extra="allow")
    target: Annotated[str, at.MinLen(1)] = Field(alias="_target_")
    seed: int | None = None


class SearchSettings(Settings):
    """The ``search:`` section of ``sweeps/hparams_search/*.yaml``."""

    study_name: Annotated[str, at.MinLen(1)]
    trials: PositiveInt  # in all: completed trials count, failed and killed ones do not
    objectives: Annotated[list[Literal[OBJECTIVES]], at.MinLen(1)]  # summary.json's keys, in order
    directions: Annotated[list[Literal["maximize", "minimize"]], at.MinLen(1)]  # one per objective
    dir: Annotated[str, at.MinLen(1)]  # the trials' run directories, and study.db by default
    storage: Annotated[str, at.MinLen(1)] | None = None  # null: sqlite:///<dir>/study.db
    max_failure_rate: Annotated[float, at.Interval(ge=0, le=1)] = 0.5
    sampler: SamplerSettings
    params: Annotated[dict[str, str | int | float | bool | None], at.MinLen(1)]  # key -> a range in Hydra's sweep syntax


def search_settings(cfg: DictConfig) -> SearchSettings:
    """The composed config's ``search:`` section, checked; one ``ConfigError`` line otherwise."""
    if cfg.get("search") is None:
        raise ConfigError(f"+{REQUEST} chose no search (the composed config has no search: section): "
                          f"name a pair's search, e.g. +{REQUEST}=muon_spectral_soft_cap")
    if "study_name" not in cfg.search or OmegaConf.is_missing(cfg.search, "study_name"):
        raise ConfigError(f"search.study_name must be given: name a pair's search, e.g. +{REQUEST}=muon_spectral_soft_cap "
                          f"(cifar_frontier and certified are parts added to one: '+{REQUEST}=[muon_spectral_soft_cap,certified]')")
    try:
        values = OmegaConf.to_container(cfg.search, resolve=True)
    except Exception as error:
        raise ConfigError(f"search: {one_line(error).removeprefix('error: ')}") from None
    settings = validate_settings(SearchSettings, values, "the search", prefix="search.")
    if len(settings.objectives) != len(settings.directions):
        raise ConfigError(f"search.directions must give one direction per objective ({len(settings.objectives)}: "
                          f"{', '.join(settings.objectives)}), got {len(settings.directions)}")
    if not settings.sampler.target.startswith("optuna.samplers."):
        raise ConfigError(f"search.sampler._target_ must be a sampler of optuna.samplers, got {settings.sampler.target!r}")
    return settings


# ----------------------------------------------------------------------------- the space


def _key(override: str) -> str:
    """``+data.x=1`` -> ``data.x``."""
    return override.split("=", 1)[0].lstrip("+~")


def distribution(override) -> Any:
    """A parsed Hydra sweep override as an Optuna distribution: ``choice`` -> categorical;
    ``interval`` -> float (Hydra reads its ends as floats); ``range`` -> int where its start, stop
    and step are integers, float otherwise, with its step (Hydra's range leaves out its stop, as
    Python's does); ``tag(log, ...)`` -> log scale."""
    from hydra.core.override_parser.types import Transformer

    distributions = needs("optuna", "a search needs Optuna").distributions
    CategoricalDistribution, FloatDistribution, IntDistribution = (
        distributions.CategoricalDistribution, distributions.FloatDistribution, distributions.IntDistribution)

    value = override.value()
    tags = set(getattr(value, "tags", ()) or ())
    if tags - {"log"}:
        raise ValueError(f"the only tag a search reads is log, got {', '.join(sorted(tags - {'log'}))}")
    log_scale = "log" in tags
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        if log_scale:
            raise ValueError("a choice has no scale: drop tag(log, ...)")
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError("the range holds no value")
        low, high, step = min(values), max(values), abs(value.step)
        if all(isinstance(v, int) for v in (*values, value.step)):
            return IntDistribution(low, high, log=log_scale, step=step)
        return FloatDistribution(float(low), float(high), log=log_scale, step=None if log_scale else float(step))
    if override.is_interval_sweep():
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError("it is one value, not a range")


def search_space(params: dict[str, Any]) -> dict[str, Any]:
    """``search.params`` as Optuna distributions, by key; one ``ConfigError`` line for a bad range."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, space = OverridesParser.create(), {}
    for key, spec in params.items():
        try:
            (override,) = parser.parse_overrides([f"{key}={spec}"])
            space[key] = distribution(override)
        except (HydraException, ValueError) as error:
            reason = " ".join(str(error).split())
            raise ConfigError(f"search.params.{key} must be a range, {SPACE_SYNTAX}; got {spec!r} ({reason})") from None
    return space


def corners(space: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every key at the low end of its range, then at the high end (a choice: its first and last)."""
    ends = [{}, {}]
    for key, dist in space.items():
        low, high = (dist.choices[0], dist.choices[-1]) if hasattr(dist, "choices") else (dist.low, dist.high)
        ends[0][key], ends[1][key] = low, high
    return ends[0], ends[1]


def override(key: str, value: Any) -> str:
    """``key=value`` as Hydra reads it back: ``null``, ``true``, a float to its last digit, a string
    quoted where Hydra's grammar would read it otherwise."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value)
    else:
        text = str(value)
        if not re.fullmatch(r"[\w./~:+-]+", text) or text in ("null", "true", "false"):
            text = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={text}"


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """A search, composed and checked: what every trial shares and what it draws."""

    overrides: list[str]  # the command line's (a trial's draws follow them)
    settings: SearchSettings
    space: dict[str, Any]  # key -> Optuna distribution
    fixed: dict[str, str]  # keys of the space the command line fixed, and their values
    folder: Path
    storage: str
    logging_config: dict | None = field(default=None, repr=False)  # Hydra's job logging, for search.log


def _compose(overrides: list[str], hydra: bool = False) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from lipschitz_lightning.config.compose import composition_error

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=overrides, return_hydra_config=hydra)
    except (HydraException, ValueError) as error:
        raise ConfigError(composition_error("train", overrides, error)) from None


def prepare(args: list[str]) -> Plan:
    """Compose and check the search once: the command line, the ``search:`` section, the space's
    keys at both ends of their ranges, the data. Every mistake is one ``ConfigError`` line here."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from lipschitz_lightning.config.compose import composition_error

    given = [a for a in args if a not in MULTIRUN_FLAGS]
    if any(_key(a) == "resume" and a.split("=", 1)[1] not in ("", "null") for a in given):
        raise ConfigError("resume continues one run, not a search: run the search's command again to resume its study, "
                          "or python train.py resume=<search dir>/trial-<n> to continue one trial")
    try:
        parsed = OverridesParser.create().parse_overrides(given)
    except HydraException as error:
        raise ConfigError(composition_error("train", given, error)) from None
    overrides = [arg for arg, o in zip(given, parsed) if not o.is_sweep_override()]
    ranges = {arg.split("=", 1)[0]: arg.split("=", 1)[1] for arg, o in zip(given, parsed) if o.is_sweep_override()}

    composed = _compose(overrides, hydra=True)
    logging_config = OmegaConf.to_container(composed.hydra.job_logging, resolve=False)
    with open_dict(composed):
        del composed["hydra"]
    settings = search_settings(composed)  # before train.yaml's keys: optimized_metrics are the search's objectives
    check_train_settings(composed)
    refuse_several_devices(composed.trainer)
    # a range on the command line replaces the file's (or adds a key); a value there fixes its key
    params = {**settings.params, **ranges}
    fixed = {_key(o): o.split("=", 1)[1] for o in overrides if _key(o) in {_key(k) for k in params}}
    params = {k: v for k, v in params.items() if _key(k) not in fixed}
    if not params:
        raise ConfigError(f"the command line fixes every key of the search space ({', '.join(fixed)}): nothing is left to search")
    settings = settings.model_copy(update={"params": params})
    space = search_space(params)
    folder = Path(settings.dir)

    needs("optuna", "a search needs Optuna")
    _sampler(settings.sampler, 0)  # its class and arguments

    from hydra.utils import instantiate

    from lipschitz_lightning.config.settings import validate_config

    for end in corners(space):  # a key no config has, or a range end out of bounds: before any trial
        cfg = _compose([*overrides, *(override(k, v) for k, v in end.items()), override("paths.output_dir", str(folder))])
        check_train_settings(cfg)
        validate_config(cfg)
    instantiate(cfg.data).prepare_data()  # the data's absence: one line, before the study is opened
    storage = settings.storage or studies.default_storage(folder)
    return Plan(overrides, settings, space, fixed, folder, storage, logging_config)


def refuse_several_devices(trainer: DictConfig) -> None:
    """A search runs its trials one after another in this process; Lightning's DDP launcher starts
    each rank by running the command line again, which here would be the whole search on every
    rank. One line instead."""
    strategy = trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    devices = trainer.get("devices")
    if "ddp" in target.lower() or "DDP" in target or devices not in (1, "1", None, "auto") or trainer.get("num_nodes", 1) != 1:
        raise ConfigError(
            f"a search runs its trials one after another in one process, on one device: trainer.devices={devices}, "
            f"trainer.strategy={target or strategy} would make Lightning start the whole search again on every rank; "
            f"search with trainer=default or trainer=gpu, then train the chosen point with trainer=ddp"
        )


def _sampler(settings: SamplerSettings, trial_number: int):
    """The sampler for trial ``trial_number``: seeded with ``seed + trial_number`` (no seed: random)."""
    from hydra.utils import get_class

    BaseSampler = needs("optuna", "a search needs Optuna").samplers.BaseSampler

    try:
        cls = get_class(settings.target)
    except Exception:
        raise ConfigError(f"search.sampler._target_ {settings.target!r} is not a class of optuna.samplers") from None
    if not (isinstance(cls, type) and issubclass(cls, BaseSampler)):
        raise ConfigError(f"search.sampler._target_ {settings.target!r} is not an Optuna sampler")
    arguments = dict(settings.model_extra or {})
    if settings.seed is not None:
        arguments["seed"] = settings.seed + trial_number
    try:
        return cls(**arguments)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"search.sampler ({settings.target}): {error}") from None


# ----------------------------------------------------------------------------- the study


def open_study(plan: Plan):
    """The plan's study, created or loaded (``optuna.create_study(load_if_exists=True)``). Optuna keeps
    a loaded study's directions whatever it is asked: another direction or objective is refused here."""
    import warnings

    optuna = needs("optuna", "a search needs Optuna")
    ExperimentalWarning = optuna.exceptions.ExperimentalWarning

    settings = plan.settings
    made = _make_folder(plan.folder)
    try:
        study = optuna.create_study(study_name=settings.study_name, storage=plan.storage, directions=settings.directions,
                                    sampler=_sampler(settings.sampler, 0), load_if_exists=True)
    except Exception as error:  # an old schema, a URL Optuna cannot open, a missing driver, no server
        for folder in made:
            folder.rmdir()
        raise ConfigError(f"search.storage {studies.shown(plan.storage)}: {' '.join(str(error).split())}") from None
    directions = [d.name.lower() for d in study.directions]
    if directions != list(settings.directions) or (study.metric_names and list(study.metric_names) != list(settings.objectives)):
        raise ConfigError(
            f"the study {settings.study_name!r} in {studies.shown(plan.storage)} {', '.join(study.metric_names or ['objectives'])} "
            f"{', '.join(directions)}; this search asks for {', '.join(settings.objectives)} {', '.join(settings.directions)}: "
            f"give it another search.study_name (or search.dir)"
        )
    if not study.metric_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names(list(settings.objectives))  # the dashboard's axes
    studies.StudyRecord(settings.study_name, studies.shown(plan.storage), tuple(settings.objectives), tuple(settings.directions)).write(plan.folder)
    return study


def _make_folder(folder: Path) -> list[Path]:
    """Make ``folder`` and return the folders made, innermost first (a study that cannot be opened
    takes them away again: a mistake leaves nothing behind)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


# ----------------------------------------------------------------------------- the trials


@dataclass
class TrialResult:
    number: int
    run_dir: Path
    values: list[float] | None  # None: failed
    error: str = ""
    summary: dict = field(default_factory=dict)


@dataclass
class SearchResult:
    ran: list[TrialResult]
    completed: int  # in the study, after this search
    stopped: str = ""  # why the search stopped before running all it was to run


class SearchStopped(LipschitzLightningError):
    """More of the search's trials failed than ``search.max_failure_rate`` allows."""


def _run_dir(folder: Path, number: int) -> Path:
    run_dir = folder / f"trial-{number:03d}"
    if run_dir.exists():  # a study started afresh beside the trials of an earlier one
        run_dir = folder / f"trial-{number:03d}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    run_dir.mkdir(parents=True)
    return run_dir


def _write_failed(run_dir: Path, error: BaseException) -> None:
    """The summary of a trial that failed before its config composed (train.py's own for the rest)."""
    (run_dir / "summary.json").write_text(json.dumps({"status": "failed", "error": f"{type(error).__name__}: {error}", "step": 0, "config": {}}, indent=2))


Launch = Callable[[list[str], int], Any]  # (a trial's overrides, its number) -> Hydra's JobReturn


def trial_overrides(plan: Plan, params: dict[str, Any], run_dir: Path) -> list[str]:
    """What the launcher composes a trial from: the command line's overrides, the drawn point, and
    its run directory (``hydra.sweep.dir`` / ``hydra.sweep.subdir``)."""
    return [*plan.overrides, *(override(k, v) for k, v in params.items()),
            override("hydra.sweep.dir", str(run_dir.parent)), override("hydra.sweep.subdir", run_dir.name)]


def run_trial(plan: Plan, launch: Launch, number: int, params: dict[str, Any], run_dir: Path) -> TrialResult:
    """One trial: the job of train.py's app with the drawn ``params``, in ``run_dir``; its objectives
    are what the job returns (``optimized_metrics``). Any failure but a SIGTERM or Ctrl-C (which end
    the process) is the trial's result."""
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else override(k, v) for k, v in params.items())
    log.info(f"trial {number} ({run_dir.name}): {shown}")
    returned = launch(trial_overrides(plan, params, run_dir), number)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    try:
        values = returned.return_value  # the job's exception, where it raised one
    except (Preempted, KeyboardInterrupt):
        raise
    except Exception as error:
        if not summary:
            _write_failed(run_dir, error)  # the trial's config did not compose: no job ran
        return TrialResult(number, run_dir, None, f"{type(error).__name__}: {error}", summary)
    if values is None:  # train.py's job: a run that diverged or was misconfigured (its summary says why)
        return TrialResult(number, run_dir, None, str(summary.get("error", "the run failed")), summary)
    missing = [key for key, value in zip(plan.settings.objectives, values) if not isinstance(value, (int, float)) or not math.isfinite(value)]
    if missing:
        return TrialResult(number, run_dir, None, f"summary.json has no finite {', '.join(missing)}", summary)
    return TrialResult(number, run_dir, [float(v) for v in values], summary=summary)


def _attributes(summary: dict) -> dict[str, Any]:
    """What the dashboard shows beside a trial's objectives: the test split's accuracy, the bound."""
    keep = ("test/", "lipschitz/", "val/")
    return {k: v for k, v in summary.items() if (k.startswith(keep) and isinstance(v, (int, float))) or k in ("step", "wall_time_s")}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _describe(values: list[float], objectives: list[str]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in zip(objectives, values))


def search(plan: Plan, launch: Launch, study=None) -> SearchResult:
    """Run the trials the plan's study lacks, each through ``launch``; return what ran. Raises
    ``SearchStopped`` when more than ``max_failure_rate`` of them failed; a SIGTERM or Ctrl-C as it
    comes (the running trial told FAIL first)."""
    TrialState = needs("optuna", "a search needs Optuna").trial.TrialState

    settings = plan.settings
    study = study or open_study(plan)
    to_run = studies.trials_left(study, settings.trials)
    done = studies.completed(study)
    log.info(f"search {settings.study_name}: {done} of {settings.trials} trials completed, {to_run} to run "
             f"(study {studies.shown(plan.storage)}, trials in {plan.folder})")
    ran: list[TrialResult] = []
    failed = 0
    for _ in range(to_run):
        if studies.completed(study) >= settings.trials:  # machines sharing the study finished it
            break
        study.sampler = _sampler(settings.sampler, len(study.trials))
        trial = study.ask(plan.space)
        run_dir = _run_dir(plan.folder, trial.number)
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        for key, value in plan.fixed.items():
            trial.set_user_attr(key, value)
        started = time.perf_counter()
        try:
            result = run_trial(plan, launch, trial.number, trial.params, run_dir)
        except BaseException as error:  # Preempted, KeyboardInterrupt, train.py's exit with 143
            trial.set_user_attr("error", one_line(error)[:1000] if isinstance(error, Exception) else "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            raise
        finally:
            _log_to_search_file(plan)  # each job configures its own logging (its train.log)
        ran.append(result)
        trial.set_user_attr("status", "completed" if result.values is not None else result.summary.get("status", "failed"))
        for key, value in _attributes(result.summary).items():
            trial.set_user_attr(key, value)
        took = _duration(time.perf_counter() - started)
        if result.values is not None:
            study.tell(trial, result.values)
            log.info(f"trial {trial.number} done: {_describe(result.values, settings.objectives)} ({took})")
            continue
        failed += 1
        trial.set_user_attr("error", result.error[:1000])
        study.tell(trial, state=TrialState.FAIL)
        log.error(f"trial {trial.number} failed: {result.error} ({took})")
        if failed > settings.max_failure_rate * to_run:
            raise SearchStopped(
                f"the search stopped: {failed} of the {len(ran)} trials it ran failed, more than search.max_failure_rate "
                f"{settings.max_failure_rate:g} of the {to_run} it was to run; the last: {result.error}"
            )
    return SearchResult(ran, studies.completed(study))


def frontier_lines(plan: Plan) -> list[str]:
    """The study's Pareto trials, one line each, and how to see them."""
    study = studies.load(plan.storage, plan.settings.study_name)
    lines = [f"{_count(len(study.best_trials), 'Pareto trial')} of {studies.completed(study)} completed:"]
    for trial in sorted(study.best_trials, key=lambda t: t.number):
        where = Path(trial.user_attrs.get("run_dir", "")).name
        lines.append(f"  trial {trial.number} ({where}): {_describe(trial.values, plan.settings.objectives)}")
    lines.append(f"the study: optuna-dashboard {studies.shown(plan.storage)}")
    lines.append(f"the table and plot: python -m lipschitz_lightning.report {plan.folder.parent}")
    return lines


# ----------------------------------------------------------------------------- the command


def _log_to_search_file(plan: Plan) -> None:
    """The console and ``<search dir>/search.log``, as Hydra's job logging sets up a run's console
    and ``train.log`` (``conf/hydra/job_logging/``); Optuna's messages through the same handlers.
    Again after every trial: its job set up logging into its own ``train.log``."""
    config = dict(plan.logging_config or {})
    for handler in (config.get("handlers") or {}).values():
        if "filename" in handler:
            handler["filename"] = str(plan.folder / "search.log")
    if config:
        logging.config.dictConfig(config)


def sweep(args: list[str], launch: Launch) -> SearchResult | None:
    """The search of ``python train.py +hparams_search=<pair> [overrides]`` (Hydra's sweeper calls it
    with the command line's overrides): a mistake is one line and exit status 1, nothing written."""
    from lipschitz_lightning.config.compose import hydra_set_aside

    optuna = needs("optuna", "a search needs Optuna")
    try:
        with hydra_set_aside():  # the checks compose configs of their own
            plan = prepare(args)
        study = open_study(plan)
    except LipschitzLightningError as error:
        exit_with(error)
    _log_to_search_file(plan)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    try:
        result = search(plan, launch, study)
    except LipschitzLightningError as error:
        log.error(one_line(error))
        sys.exit(getattr(error, "exit_status", 1))
    failed = sum(r.values is None for r in result.ran)
    log.info(f"search {plan.settings.study_name}: ran {_count(len(result.ran), 'trial')} ({failed} failed); "
             f"the study holds {result.completed} completed of {plan.settings.trials}")
    for line in frontier_lines(plan):
        log.info(line)
    return result
