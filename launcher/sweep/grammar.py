"""A config's `sweep:` section: the swept keys (a grid of lists, or distributions to sample) and how the sweep runs.

    sweep:
      gossip.method: [gossip, allreduce, none]   # a list: every value (the grid: Cartesian product, first key slowest)
      optim.lr: {loguniform: [0.01, 0.2]}        # a distribution (uniform, loguniform, randint [lo, hi)): sampled
      search: random                              # grid (default) | random | optuna
      samples: 4                                  # random: samples per grid point; optuna: trials in all
      max_concurrent: 2                           # swarms at once (default 1)
      metric: test_acc                            # what optuna and early stopping look at: the swarm's mean per epoch
      early_stop: true                            # ASHA stops the trials that trail at epoch milestones
      arms:                                       # grid: each arm's settings, crossed with every grid point (methods
        - {gossip.method: gossip, gossip.overlap: true}   # whose knobs differ, which one grid cannot hold)
        - {gossip.method: allreduce}
      target_acc: 0.8                             # the accuracy `analyze` times the runs to (fixed before running)

The setting names are not config keys, so they cannot clash with a swept key. Every point of a grid or random
sweep is validated when the file loads, before Ray starts; an optuna sweep picks its points as it goes, so each
swept key's extremes are validated instead.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError, model_validator

from workers.core.config import (
    ExperimentConfig,
    _Section,
    _short,
    apply_overrides,
    format_validation_error,
    parse_config,
    read_config_file,
)
from workers.core.errors import ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "randint")


class SweepSettings(_Section):
    search: Literal["grid", "random", "optuna"] = "grid"
    samples: int = Field(1, ge=1)  # random: per grid point; optuna: trials in all
    max_concurrent: int = Field(1, ge=1)
    metric: Literal["test_acc", "test_loss"] = "test_acc"
    early_stop: bool = False
    arms: list[dict[str, Any]] = []  # grid: each arm's settings (dotted keys), crossed with every grid point
    target_acc: float | None = Field(None, gt=0, le=1)  # the comparison's target accuracy, chosen before running

    @model_validator(mode="after")
    def _arms_in_a_grid(self) -> SweepSettings:
        if self.arms and self.search != "grid":
            raise ValueError(f"arms: only a grid sweep takes them (search={self.search})")
        return self

    @property
    def mode(self) -> str:
        return "max" if self.metric == "test_acc" else "min"


SETTING_KEYS = tuple(SweepSettings.model_fields)


@dataclass(frozen=True)
class Distribution:
    kind: str  # one of DISTRIBUTIONS
    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float | int:
        if self.kind == "randint":
            return int(rng.integers(int(self.low), int(self.high)))
        if self.kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    def extremes(self) -> list[float | int]:
        return [int(self.low), int(self.high) - 1] if self.kind == "randint" else [self.low, self.high]


@dataclass(frozen=True)
class SweepPoint:
    overrides: tuple[str, ...]  # this point's `key=value` settings
    config: ExperimentConfig


@dataclass(frozen=True)
class Sweep:
    name: str
    keys: tuple[str, ...]  # the swept dotted keys, in the order written
    points: tuple[SweepPoint, ...]  # grid/random: the points to run; optuna: the extremes that were validated
    spec: dict[str, Any]  # the file after --set, `sweep:` included: what to snapshot to rerun it
    settings: SweepSettings = field(default_factory=SweepSettings)
    space: dict[str, list | Distribution] = field(default_factory=dict)  # each key's values or distribution

    @property
    def adaptive(self) -> bool:
        """The points are chosen while the sweep runs (optuna), not known up front."""
        return self.settings.search == "optuna"

    @property
    def base(self) -> dict[str, Any]:
        return {key: value for key, value in self.spec.items() if key != "sweep"}

    def trial_config(self, values: dict[str, Any]) -> tuple[tuple[str, ...], ExperimentConfig]:
        """The overrides and config of the point with these swept values (an optuna trial's)."""
        overrides = tuple(f"{key}={yaml_scalar(values[key])}" for key in self.keys)
        return overrides, parse_config(apply_overrides(self.base, list(overrides)))


def parse_sweep(raw: dict[str, Any], overrides: list[str]) -> Sweep:
    """Every point validated now (see the module's docstring), so a bad point stops the sweep before anything runs."""
    base = {key: value for key, value in raw.items() if key != "sweep"}
    section = raw["sweep"]
    settings = parse_settings(section)
    swept = {k: v for k, v in section.items() if k not in SETTING_KEYS} if isinstance(section, dict) else section
    space = parse_space(swept, settings.search)
    _reject_swept_overrides(overrides, list(space))
    base = apply_overrides(base, overrides)
    point_overrides = [arm + point for arm in arm_overrides(settings.arms)
                       for point in sweep_points(space, settings, base.get("seed", 0))]  # fmt: skip
    points, errors = [], []
    for number, point in enumerate(point_overrides, 1):
        try:
            points.append(SweepPoint(tuple(point), parse_config(apply_overrides(base, point))))
        except ConfigError as err:
            errors.append(f"sweep point {number}/{len(point_overrides)} ({', '.join(point)}): {err}")
    if errors:
        raise ConfigError("\n".join(errors))
    keys = tuple(dict.fromkeys([*(key for arm in settings.arms for key in arm), *space]))
    return Sweep(points[0].config.name, keys, tuple(points), {**base, "sweep": section}, settings, space)


def arm_overrides(arms: list[dict[str, Any]]) -> list[list[str]]:
    """Each arm's settings as overrides ([[]]: no arms, the grid alone)."""
    return [[f"{key}={yaml_scalar(value)}" for key, value in arm.items()] for arm in arms] or [[]]


def parse_settings(section: Any) -> SweepSettings:
    given = {k: v for k, v in section.items() if k in SETTING_KEYS} if isinstance(section, dict) else {}
    try:
        return SweepSettings(**given)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err).replace("\n  ", "\n  sweep.")) from None


def parse_space(swept: Any, search: str) -> dict[str, list | Distribution]:
    """Each swept key's list of values or its distribution; distributions need a search that samples."""
    grid_example = "gossip.alpha: [0.5, 1.0]"
    if not isinstance(swept, dict) or not swept:
        raise ConfigError(f"sweep={_short(swept)}: expected dotted keys with lists of values, e.g. {grid_example}")
    space: dict[str, list | Distribution] = {}
    for key, values in swept.items():
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"sweep: key {key!r} is not a dotted config key such as gossip.alpha")
        if isinstance(values, list) and values:
            space[key] = values
            continue
        space[key] = parse_distribution(key, values)
        if search == "grid":
            raise ConfigError(f"sweep.{key}={_short(values)}: a distribution is sampled: set sweep.search to "
                              "random or optuna, or give a list of values")  # fmt: skip
    return space


def parse_distribution(key: str, value: Any) -> Distribution:
    kinds = ", ".join(f"{{{kind}: [low, high]}}" for kind in DISTRIBUTIONS)
    error = ConfigError(f"sweep.{key}={_short(value)}: expected a non-empty list of values or a distribution: {kinds}")
    if not isinstance(value, dict) or len(value) != 1:
        raise error
    ((kind, bounds),) = value.items()
    numbers = isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int | float) for b in bounds)
    if kind not in DISTRIBUTIONS or not numbers:
        raise error
    low, high = bounds
    if not low < high or (kind == "loguniform" and low <= 0) or (kind == "randint" and high - low < 1):
        raise ConfigError(f"sweep.{key}={_short(value)}: needs low < high" + (" and low > 0" * (kind == "loguniform")))
    return Distribution(kind, low, high)


def sweep_points(space: dict[str, list | Distribution], settings: SweepSettings, seed: int) -> list[list[str]]:
    """grid: the Cartesian product of the lists; random: `samples` draws of the distributions per grid point (seeded
    by the config's seed, so a rerun draws the same points); optuna: each key's extremes, for validation."""
    if settings.search == "optuna":
        return extreme_points(space)
    grid = {k: v for k, v in space.items() if isinstance(v, list)}
    if settings.search == "grid":
        return expand_grid(grid)
    rng, points = np.random.default_rng(seed), []
    for grid_point in expand_grid(grid) if grid else [[]]:
        fixed = dict(item.split("=", 1) for item in grid_point)
        for _ in range(settings.samples):
            drawn = {k: yaml_scalar(v.sample(rng)) for k, v in space.items() if isinstance(v, Distribution)}
            points.append([f"{key}={fixed[key] if key in fixed else drawn[key]}" for key in space])
    return points


def extreme_points(space: dict[str, list | Distribution]) -> list[list[str]]:
    """One point per extreme value of each key, the other keys at their first value."""
    choices = {k: v if isinstance(v, list) else v.extremes() for k, v in space.items()}
    points = []
    for key, values in choices.items():
        for value in values:
            chosen = {k: (value if k == key else vs[0]) for k, vs in choices.items()}
            point = [f"{k}={yaml_scalar(v)}" for k, v in chosen.items()]
            if point not in points:
                points.append(point)
    return points


def expand_grid(sweep: dict[str, list]) -> list[list[str]]:
    """{'a': [1, 2], 'b': [x]} -> [['a=1', 'b=x'], ['a=2', 'b=x']]: the Cartesian product, first key slowest."""
    space = parse_space(sweep, "grid")
    settings = [[f"{key}={yaml_scalar(value)}" for value in values] for key, values in space.items()]
    return [list(point) for point in itertools.product(*settings)]


def yaml_scalar(value: Any) -> str:
    """`value` written so that apply_overrides reads back the same value ('1.5' stays a string, 1.5 a float)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1_000_000).removesuffix("\n...\n").rstrip("\n")


def _reject_swept_overrides(overrides: list[str], swept: list[str]) -> None:
    for item in overrides:
        key = item.partition("=")[0].strip()
        clash = [s for s in swept if key == s or key.startswith(s + ".") or s.startswith(key + ".")]
        if clash:
            raise ConfigError(f"override {item!r}: {clash[0]} is swept; drop it from --set or from the sweep")


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig | Sweep:
    """What `gossip-launch run` takes: one experiment, or a sweep when the file has a `sweep:` section."""
    raw = read_config_file(path)
    if "sweep" not in raw:
        return parse_config(apply_overrides(raw, overrides or []))
    return parse_sweep(raw, overrides or [])
