"""The LCM scheduler tables: one per step count (and per image-to-image strength), computed by diffusers at export.

:class:`StepTable` and :class:`SchedulerInfo` read them and check that they are one LCM schedule: timesteps
strictly decreasing, values in their ranges, sqrt_alpha² + sqrt_beta² = 1 and c_skip + c_out² = 1, each next-step
column equal to the next row, and every value a function of the timestep alone (equal across tables, monotonic).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from lcm_export.runtime.manifest.vocabulary import (
    MAX_SCHEDULER_VALUE,
    MAX_SCHEDULES,
    MAX_TRAIN_TIMESTEPS,
    PREDICTION_TYPES,
    STEP_COUNT,
    STRENGTH_KEY,
    TABLE_TOLERANCE,
)
from lcm_export.runtime.specs import Fields, ManifestFieldError, as_float, as_int, as_list, describe


def _same_json(first: Any, second: Any) -> bool:
    """Equal as JSON values: 1 == 1.0, but true is not 1."""
    return first == second and isinstance(first, bool) == isinstance(second, bool)


# Ranges of the table columns (diffusers' LCMScheduler): alpha_bar_t in (0, 1); c_skip(t) > 0 and c_out(t) in
# [0, 1] for the boundary condition above.
_TABLE_RANGES: dict[str, dict[str, float]] = {
    "c_skip": {"above": 0.0, "maximum": 1.0},
    "c_out": {"minimum": 0.0, "maximum": 1.0},
    "sqrt_alpha_prod": {"above": 0.0, "maximum": 1.0},
    "sqrt_beta_prod": {"minimum": 0.0, "maximum": 1.0},
    "sqrt_alpha_prod_next": {"above": 0.0, "maximum": 1.0},
    "sqrt_beta_prod_next": {"minimum": 0.0, "maximum": 1.0},
}


@dataclass(frozen=True)
class StepTable:
    """Everything one N-step LCM run needs, per step, computed by diffusers' LCMScheduler at export."""

    timesteps: tuple[int, ...]
    c_skip: tuple[float, ...]
    c_out: tuple[float, ...]
    sqrt_alpha_prod: tuple[float, ...]  # sqrt(alpha_bar_t)
    sqrt_beta_prod: tuple[float, ...]  # sqrt(1 - alpha_bar_t)
    sqrt_alpha_prod_next: tuple[float, ...]  # sqrt(alpha_bar) of the next timestep (this one's at the last step)
    sqrt_beta_prod_next: tuple[float, ...]

    def to_json(self) -> dict[str, list]:
        return {name: list(getattr(self, name)) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: Any, where: str = "table", steps: int | None = None) -> StepTable:
        """Read the columns (each ``steps`` long, or as long as ``timesteps``) and check that they are one LCM
        schedule (see the module docstring)."""
        fields = Fields.of(data, where)
        if steps is None:
            steps = len(as_list(fields.get("timesteps"), fields.path("timesteps"), min_length=1))
        columns: dict[str, tuple] = {}
        for name in cls.__dataclass_fields__:
            items = fields.array(name, min_length=steps, max_length=steps)
            if name == "timesteps":
                limit = MAX_TRAIN_TIMESTEPS - 1
                columns[name] = tuple(as_int(value, at, minimum=0, maximum=limit) for at, value in items)
            else:
                columns[name] = tuple(as_float(value, at, **_TABLE_RANGES[name]) for at, value in items)
        table = cls(**columns)
        table._check(fields)
        return table

    def _check(self, fields: Fields) -> None:
        for index in range(len(self.timesteps)):
            if index and self.timesteps[index] >= self.timesteps[index - 1]:
                raise ManifestFieldError(
                    f"{fields.path('timesteps')}[{index}]",
                    f"must be below the timestep before it, {self.timesteps[index - 1]} (timesteps strictly "
                    f"decrease; got {self.timesteps[index]})",
                )
            alpha, beta = self.sqrt_alpha_prod[index], self.sqrt_beta_prod[index]
            if abs(alpha * alpha + beta * beta - 1) > TABLE_TOLERANCE:
                raise ManifestFieldError(
                    f"{fields.path('sqrt_beta_prod')}[{index}]",
                    f"does not go with sqrt_alpha_prod[{index}]: their squares must add up to 1 (got {beta!r} and "
                    f"{alpha!r})",
                )
            c_skip, c_out = self.c_skip[index], self.c_out[index]
            if abs(c_skip + c_out * c_out - 1) > TABLE_TOLERANCE:
                raise ManifestFieldError(
                    f"{fields.path('c_out')}[{index}]",
                    f"does not go with c_skip[{index}]: c_skip + c_out² must be 1 (got {c_out!r} and {c_skip!r})",
                )
            if index + 1 < len(self.timesteps):  # the next-step columns at the last step are not used
                for column in ("sqrt_alpha_prod", "sqrt_beta_prod"):
                    if getattr(self, f"{column}_next")[index] != getattr(self, column)[index + 1]:
                        raise ManifestFieldError(
                            f"{fields.path(column + '_next')}[{index}]",
                            f"must equal {column}[{index + 1}], the next step's (got "
                            f"{getattr(self, column + '_next')[index]!r} and {getattr(self, column)[index + 1]!r})",
                        )


# Scheduler options that the exporter copies from the scheduler config: both copies must agree.
_CONFIG_COPIES = (
    "prediction_type",
    "clip_sample",
    "clip_sample_range",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
)


@dataclass(frozen=True)
class SchedulerInfo:
    prediction_type: str  # "epsilon", "v_prediction" or "sample"
    tables: dict[int, StepTable]  # number of steps -> text-to-image table (strength 1)
    init_noise_sigma: float = 1.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    config: dict[str, Any] = field(default_factory=dict)  # the LCMScheduler config, for provenance
    # (steps, strength < 1) -> the table of an image-to-image run at that strength (key "steps@strength")
    partial_tables: dict[tuple[int, float], StepTable] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        skip = ("tables", "partial_tables")
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in skip}
        data["tables"] = {str(steps): table.to_json() for steps, table in sorted(self.tables.items())}
        for (steps, strength), table in sorted(self.partial_tables.items()):
            data["tables"][strength_key(steps, strength)] = table.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "scheduler") -> SchedulerInfo:
        fields = Fields.of(data, where)
        config = fields.object("config")
        num_train_timesteps = config.integer("num_train_timesteps", minimum=1, maximum=MAX_TRAIN_TIMESTEPS)
        tables, partial_tables = _read_tables(fields.object("tables"), num_train_timesteps)
        info = cls(
            prediction_type=fields.string("prediction_type", choices=PREDICTION_TYPES),
            tables=tables,
            partial_tables=partial_tables,
            init_noise_sigma=fields.number("init_noise_sigma", above=0, maximum=MAX_SCHEDULER_VALUE),
            clip_sample=fields.boolean("clip_sample"),
            clip_sample_range=fields.number("clip_sample_range", above=0, maximum=MAX_SCHEDULER_VALUE),
            thresholding=fields.boolean("thresholding"),
            dynamic_thresholding_ratio=fields.number("dynamic_thresholding_ratio", above=0, maximum=1),
            sample_max_value=fields.number("sample_max_value", above=0, maximum=MAX_SCHEDULER_VALUE),
            config=config.data,
        )
        for name in _CONFIG_COPIES:
            value = getattr(info, name)
            if config.has(name) and not _same_json(config.get(name), value):
                raise ManifestFieldError(
                    config.path(name),
                    f"must equal {fields.path(name)}, {describe(value)}, which the runtime uses "
                    f"(got {describe(config.get(name))})",
                )
        return info


def strength_key(steps: int, strength: float) -> str:
    """The ``tables`` key of a table: "4" at strength 1, "4@0.5" for image-to-image (strength to 6 decimals,
    written without trailing zeros: one key per table)."""
    rounded = round(strength, 6)
    if rounded >= 1:
        return str(steps)
    if rounded <= 0:
        raise ValueError(f"strength {strength} rounds to 0: an image-to-image table needs a strength in (0, 1]")
    return f"{steps}@{rounded:.6f}".rstrip("0")


def _read_tables(
    tables: Fields, num_train_timesteps: int
) -> tuple[dict[int, StepTable], dict[tuple[int, float], StepTable]]:
    """One text-to-image table per step count 1..N, any image-to-image tables ("steps@strength"), and across all
    of them every value a function of the timestep alone."""
    present: set[int] = set()
    partial_keys: dict[str, tuple[int, float]] = {}
    for key in tables.data:
        partial = STRENGTH_KEY.fullmatch(key)
        if (
            partial
            and 1 <= int(partial.group(1)) <= MAX_SCHEDULES
            and 0 < float(partial.group(2)) < 1
            and strength_key(int(partial.group(1)), float(partial.group(2))) == key  # one spelling per table
        ):
            partial_keys[key] = (int(partial.group(1)), float(partial.group(2)))
            continue
        if not STEP_COUNT.fullmatch(key) or int(key) > MAX_SCHEDULES:
            raise ManifestFieldError(
                tables.path(key), f"is not a step count from 1 to {MAX_SCHEDULES} (or STEPS@STRENGTH, e.g. 4@0.5)"
            )
        present.add(int(key))
    if not present:
        raise ManifestFieldError(tables.where, "must hold the tables for 1..N steps (it is empty)")
    count = max(present)
    missing = [steps for steps in range(1, count + 1) if steps not in present]
    if missing:
        raise ManifestFieldError(
            tables.path(str(missing[0])), f"is missing: the tables cover every step count from 1 to N (here {count})"
        )
    result: dict[int, StepTable] = {}
    partial_result: dict[tuple[int, float], StepTable] = {}
    rows: dict[int, tuple[tuple[float, ...], str]] = {}  # timestep -> (c_skip, c_out, sqrt_alpha, sqrt_beta), field
    keys = [(str(steps), steps, None) for steps in range(1, count + 1)]
    keys += [(key, steps, strength) for key, (steps, strength) in partial_keys.items()]
    for key, steps, strength in keys:
        where = tables.path(key)
        # An image-to-image table may run fewer steps than asked (diffusers' SD img2img slices the schedule).
        table = StepTable.from_json(tables.get(key), where, steps if strength is None else None)
        if len(table.timesteps) > steps:
            raise ManifestFieldError(
                f"{where}.timesteps", f"has {len(table.timesteps)} steps: a table for {steps} runs at most {steps}"
            )
        for index, timestep in enumerate(table.timesteps):
            at = f"{where}.timesteps[{index}]"
            if timestep >= num_train_timesteps:
                raise ManifestFieldError(
                    at, f"must be below scheduler.config.num_train_timesteps, {num_train_timesteps} (got {timestep})"
                )
            row = (table.c_skip[index], table.c_out[index], table.sqrt_alpha_prod[index], table.sqrt_beta_prod[index])
            if timestep in rows and rows[timestep][0] != row:
                raise ManifestFieldError(
                    at,
                    f"is {timestep} with other c_skip, c_out or sqrt_alpha/beta_prod values than at "
                    f"{rows[timestep][1]} (each is a function of the timestep)",
                )
            rows.setdefault(timestep, (row, at))
        if strength is None:
            result[steps] = table
        else:
            partial_result[(steps, strength)] = table
    # alpha_bar_t and c_skip(t) decrease as t grows (float32 rounding keeps that order, not always strictly).
    ordered = sorted(rows.items())
    for (smaller, (lower, lower_at)), (timestep, (higher, at)) in itertools.pairwise(ordered):
        if higher[0] > lower[0] or higher[2] > lower[2]:
            raise ManifestFieldError(
                at,
                f"is {timestep}, but its c_skip or sqrt_alpha_prod is above the one of the smaller timestep "
                f"{smaller} at {lower_at} (both decrease as the timestep grows)",
            )
    return result, partial_result
