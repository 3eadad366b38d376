"""A reproduction's ``manifest.json`` (written by [`airvae.reproduce`][]): every field checked by type
and range before it names a path. ``airvae report`` reads a local folder's manifest through it, and
[`airvae.bundle`][] every manifest an archive holds."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection
from pathlib import Path, PurePosixPath
from typing import Any

from .config import ARCHITECTURES, BUDGETS, MAX_SEED, ConfigError, check_int, is_real, require
from .evaluation import EvaluationSettings
from .files import RunError
from .sweep import FAMILIES, Job
from .targets import STRENGTHS, TARGETS

MAX_COUNT = 2**32 - 1  # k, m, examples: far beyond any machine's memory; bounded so that run names stay short
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")  # one path component: never "", "." or ".."


def manifest_jobs(manifest: object, where: Path | str, fix: str) -> list[Job]:
    """The runs ([`airvae.sweep.Job`][]) of a reproduction's parsed ``manifest.json``, after
    every field is checked by type and range (``check_manifest``): its fields name the folders
    that ``report``, ``evaluate`` and ``bundle`` read and write. A bad one is a RunError naming
    ``where`` (the file) with ``fix``."""

    try:
        return check_manifest(manifest)
    except ConfigError as error:
        raise RunError(f"{where}: {said(error)}; {fix}") from None


def said(error: Exception, limit: int = 500) -> str:
    """An error's message, cut short: a crafted manifest's value could fill the screen."""
    text = str(error)
    return text if len(text) <= limit else f"{text[:limit]}..."


def check_manifest(manifest: Any) -> list[Job]:
    """Every field a reproduction's manifest holds (airvae.reproduce), by type and range; the jobs
    as [`airvae.sweep.Job`][]. Raises [`airvae.config.ConfigError`][] saying which field."""

    require(isinstance(manifest, dict), "manifest", type(manifest).__name__, "a JSON object")
    for key in ("target", "datasets", "budget", "seeds", "grid", "evaluation", "jobs"):
        if key not in manifest:
            raise ConfigError(f"{key!r} is missing")
    _check_choice("target", manifest["target"], TARGETS)
    datasets = manifest["datasets"]
    require(isinstance(datasets, list) and bool(datasets), "datasets", datasets, "a non-empty list of dataset names")
    for dataset in datasets:
        _check_dataset(dataset)
    _check_choice("budget", manifest["budget"], BUDGETS)
    check_int("seeds", manifest["seeds"], 1, MAX_SEED + 1)
    if "strengths" in manifest:  # manifests before `--strengths` have none
        _check_choice("strengths", manifest["strengths"], STRENGTHS)
    grid = manifest["grid"]
    require(isinstance(grid, list) and all(_is_finite(v) and v > 0 for v in grid), "grid", grid,
            "a list of finite strengths > 0")
    for key in ("evaluation", "extra_evaluation"):
        _check_evaluation(key, manifest.get(key))
    _check_study(manifest.get("study"))
    jobs = manifest["jobs"]
    require(isinstance(jobs, list) and bool(jobs), "jobs", jobs, "a non-empty list of runs")
    checked = []
    for number, fields in enumerate(jobs):
        try:
            checked.append(_check_job(fields))
        except ValueError as error:  # ConfigError, or sweep.Job's own check
            raise ConfigError(f"jobs[{number}]: {error}") from None
    return checked


def _check_job(fields: Any) -> Job:
    """One job of a manifest as a [`airvae.sweep.Job`][]: each field checked here, before
    Job's own checks (family, and its strength) and before [`name`][airvae.sweep.Job.name] makes a path of them."""

    require(isinstance(fields, dict), "run", fields, "a JSON object of a run's fields")
    unknown = sorted(set(fields) - {field.name for field in dataclasses.fields(Job)})
    if unknown:
        raise ConfigError(f"unknown field {', '.join(map(repr, unknown))}")
    for key in ("family", "dataset"):
        if key not in fields:
            raise ConfigError(f"{key!r} is missing")
    _check_choice("family", fields["family"], FAMILIES)
    _check_dataset(fields["dataset"])
    for key in ("k", "m"):
        check_int(key, fields.get(key, 1), 1, MAX_COUNT)
    strength = fields.get("strength", 0.0)
    require(is_real(strength) and math.isfinite(strength) and strength >= 0, "strength", strength,
            "a finite number >= 0")
    check_int("seed", fields.get("seed", 0), 0, MAX_SEED)
    _check_choice("budget", fields.get("budget", "quick"), BUDGETS)
    check_int("track_test_examples", fields.get("track_test_examples", 0), 0, MAX_COUNT)
    if fields.get("iterations") is not None:
        check_int("iterations", fields["iterations"], 1, MAX_COUNT)
    if fields.get("architecture") is not None:
        _check_choice("architecture", fields["architecture"], ARCHITECTURES)
    return Job(**fields)


def _check_choice(name: str, value: object, allowed: Collection[str]) -> None:

    require(isinstance(value, str) and value in allowed, name, value, ", ".join(allowed))


def _check_dataset(value: object) -> None:
    """A dataset's name, or the path of its .npz file: what names the runs' folders (the name, or
    the file's stem) must be one plain path component."""

    named = PurePosixPath(value).stem if isinstance(value, str) and value.endswith(".npz") else value
    require(isinstance(value, str) and "\0" not in value and isinstance(named, str)
            and PLAIN_NAME.fullmatch(named) is not None, "dataset", value,
            "a dataset name (letters, digits, _ . + -), or the path of a .npz file with such a name")


def _is_finite(value: object) -> bool:

    return is_real(value) and math.isfinite(value)


def _check_evaluation(key: str, settings: object) -> None:
    """None, or the fields of [`airvae.evaluation.EvaluationSettings`][], checked by it."""

    if settings is None:
        return
    if not isinstance(settings, dict):
        raise ConfigError(f"invalid {key} = {settings!r}: allowed null or a JSON object of evaluation settings")
    try:
        EvaluationSettings.from_dict(settings)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{key}: {error}") from None


_STUDY_COUNTS = {"ks": 1, "steps_list": 0}  # Figure 3's study (targets.FIGURE3_STUDIES): lists, by their minimum
_STUDY_INTS = {"fixed_steps": 0, "svi_k": 1, "l": 1}


def _check_study(study: Any) -> None:
    """None, or Figure 3's settings ([`airvae.targets.FIGURE3_STUDIES`][]), by type and range."""

    if study is None:
        return
    fields = {*_STUDY_COUNTS, *_STUDY_INTS, "max_examples"}
    require(isinstance(study, dict) and set(study) == fields, "study", study,
            f"null or a JSON object of {', '.join(sorted(fields))}")
    try:
        for key, minimum in _STUDY_COUNTS.items():
            require(isinstance(study[key], list) and bool(study[key]), key, study[key], "a non-empty list of integers")
            for value in study[key]:
                check_int(key, value, minimum, MAX_COUNT)
        for key, minimum in _STUDY_INTS.items():
            check_int(key, study[key], minimum, MAX_COUNT)
        if study["max_examples"] is not None:
            check_int("max_examples", study["max_examples"], 1, MAX_COUNT)
    except ConfigError as error:
        raise ConfigError(f"study: {error}") from None


