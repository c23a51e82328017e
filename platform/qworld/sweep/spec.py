"""Sweep files: one YAML file per sweep, loaded into frozen dataclasses and validated.

Everything here runs before Ray starts. A bad file raises :class:`SweepSpecError` whose
message names the field (``goals.num_goals``), the bad value and what is allowed; the CLI
turns it into exit code 2 with nothing launched.

A sweep file (all sections but ``name`` and ``env`` optional)::

    name: fourrooms_demo            # W&B group and experiment dir name
    env:                            # env id + its kwargs (variant, layout, ...)
      id: qworld/FourRooms-v0
      variant: deterministic
    goals:                          # the goal family every trial trains on
      goal_type: indicator          # indicator | dense (finite); position | velocity | ...
      num_goals: 68                 # L; null = every state (indicator goals)
      goal_seed: 0                  # goal placement seed
    agent: {lr: 0.001, hidden_sizes: [256, 256]}  # the learner family's config keywords
                                    # (qworld.agents.families.ALGORITHMS); algorithm: pqn
                                    # (default) | dqn; PQN's q_output: auto (default) =
                                    # sigmoid for indicator goals, linear for dense ones
    sweep:                          # grid_search axes (Tune grid, cartesian product)
      variant: [deterministic, windy]
      num_goals: [4, 68]
      seed: [0, 1]
      algorithm: [pqn, dqn]         # learner families; every agent keyword of the file
                                    # must be one each family accepts
      # cases: [{variant: windy, num_goals: 4}, ...]   explicit env/goal cells (and agent
      #                                                 keywords of a case), crossed
      #                                                 with the other axes
    stop: {env_steps: 200000}       # env_steps | training_iteration | time_total_s
    checkpoint: {every: 5, at_end: true}
    extract: {methods: [pinv, column_match], tasks: [corner_9_9_doorway]}
    # any finite env: gymnasium's tabular ones by their id and kwargs, or an .npz MDP
    #   env: {id: FrozenLake-v1, map_name: 8x8, is_slippery: true}   (-> qworld/FrozenLake-v1)
    #   env: {id: qworld/TabularMDP-v0, path: my_mdp.npz}               (path made absolute)
    # planning tasks of your own: cells [row, col] or state indices (see planning.PlanningTask)
    #   extract: {tasks: [{name: cross, start: [0, 0], goal: [7, 7], forbidden: [[5, 4]]}]}
    resources: {cpus_per_trial: 1, gpus_per_trial: 0, plearn_actors: 1}
    wandb: {project: qworld, group: null, mode: offline}
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from qworld import metrics as K


class SweepSpecError(ValueError):
    """A sweep file is invalid; the message names the field and the allowed values."""


# Axes a sweep may grid over, and where each lands. Agent keywords are axes too.
ENV_AXES = ("variant", "layout")  # and a finite env's own kwargs (env_axes_of: map_name, is_slippery, ...)
GOAL_AXES = ("goal_type", "num_goals", "goal_seed")
TRIAL_AXES = ("seed",)
# Tune stop keys a user may write, and the real metric each maps to.
STOP_KEYS = {
    K.ENV_STEPS: K.TRAIN_ENV_STEPS,
    "training_iteration": "training_iteration",
    "time_total_s": "time_total_s",
}
WANDB_MODES = ("offline", "online", "disabled")
SECTIONS = ("name", "env", "goals", "agent", "sweep", "stop", "checkpoint", "extract",
            "resources", "wandb")


@dataclass(frozen=True)
class EnvSpec:
    id: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # variant, layout, ...


@dataclass(frozen=True)
class GoalsSpec:
    goal_type: str = "indicator"
    num_goals: int | None = None  # None: every state (indicator) / env default
    goal_seed: int = 0  # goal placement
    goal_cells: tuple | None = None  # explicit goal cells (finite envs)


@dataclass(frozen=True)
class CheckpointSpec:
    every: int = 0  # training iterations between checkpoints; 0 = only at the end
    at_end: bool = True


@dataclass(frozen=True)
class ExtractSpec:
    methods: tuple[str, ...] = ("pinv", "column_match")  # every method of any family, in order
    # safety tasks (finite: a planning.SAFETY_TASKS name or a planning.PlanningTask defined in
    # the file) / unseen-goal tasks (continuous)
    tasks: tuple = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per method
    # `methods: {pqn: [successor, supervised], d3g: [forward_model]}` in a file: each learner
    # family's own methods (a crossed sweep scores a family only by what applies to it)
    per_algorithm: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def plan(self) -> tuple[str, ...] | dict[str, tuple[str, ...]]:
        """What the scorer is handed (``score_checkpoint(methods=...)``): the methods, or
        family -> methods."""
        return dict(self.per_algorithm) if self.per_algorithm else self.methods

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks' names (their column prefixes)."""
        from qworld.worldmodel.planning import task_name

        return tuple(task_name(t) for t in self.tasks)

    def tasks_named(self, names) -> tuple:
        """The tasks ``names`` stand for: a task this spec defines, else the name itself."""
        from qworld.worldmodel.planning import task_name

        defined = {task_name(t): t for t in self.tasks}
        return tuple(defined.get(n, n) for n in names)

    def tasks_as_written(self) -> list:
        """The tasks as a sweep file writes them (names, and mappings for defined tasks)."""
        return [t if isinstance(t, str) else t.to_mapping() for t in self.tasks]


@dataclass(frozen=True)
class ResourcesSpec:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # becomes num_gpus_per_learner
    plearn_actors: int = 1  # P-learning actors scoring checkpoints
    max_concurrent_trials: int | None = None
    max_failures: int = 2  # Tune retries of a failed trial


@dataclass(frozen=True)
class WandbSpec:
    project: str = "qworld"
    group: str | None = None  # None: the sweep name
    mode: str = "offline"


@dataclass(frozen=True)
class SweepSpec:
    name: str
    env: EnvSpec
    goals: GoalsSpec = GoalsSpec()
    agent: Mapping[str, Any] = field(default_factory=dict)
    sweep: Mapping[str, tuple] = field(default_factory=dict)
    stop: Mapping[str, float] = field(default_factory=lambda: {K.ENV_STEPS: 100_000})
    checkpoint: CheckpointSpec = CheckpointSpec()
    extract: ExtractSpec = ExtractSpec()
    resources: ResourcesSpec = ResourcesSpec()
    wandb: WandbSpec = WandbSpec()
    source: str = ""  # the YAML text after --set overrides, kept for reports

    @property
    def wandb_group(self) -> str:
        return self.wandb.group or self.name

    @property
    def env_axes(self) -> tuple[str, ...]:
        """The env kwargs this sweep may grid over (:func:`env_axes_of`)."""
        return env_axes_of(self.env.id)

    @property
    def grid_axes(self) -> tuple[str, ...]:
        """The axes that vary across cells (the keys of ``cases`` included)."""
        axes = [a for a in self.sweep if a != "cases"]
        for case in self.sweep.get("cases", ()):
            axes += [k for k in case if k not in axes]
        return tuple(axes)

    def cells(self) -> list[dict[str, Any]]:
        """Every grid cell as a flat dict of axis -> value (cartesian product, file order)."""
        axes = [a for a in self.sweep if a != "cases"]
        cases = self.sweep.get("cases", ({},))
        return [{**case, **dict(zip(axes, values))}
                for case in cases
                for values in itertools.product(*(self.sweep[a] for a in axes))]

    def cell_config(self, cell: Mapping[str, Any]) -> tuple[str, dict, dict]:
        """(env_id, env_kwargs, agent keywords) of one grid cell, defaults filled in."""
        env_kwargs = dict(self.env.kwargs)
        env_kwargs.update(goal_type=self.goals.goal_type, num_goals=self.goals.num_goals,
                          goal_seed=self.goals.goal_seed)
        if self.goals.goal_cells is not None:
            env_kwargs["goal_cells"] = [tuple(c) for c in self.goals.goal_cells]
        agent = dict(self.agent)
        for axis, value in cell.items():
            if axis in self.env_axes or axis in GOAL_AXES:
                env_kwargs[axis] = value
            elif axis not in TRIAL_AXES:
                agent[axis] = value
        return self.env.id, env_kwargs, agent


# --------------------------------------------------------------------------------------
# loading


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read, override (``--set a.b=value``) and validate a sweep file."""
    path = Path(path)
    if not path.is_file():
        raise SweepSpecError(f"sweep file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepSpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SweepSpecError(f"{path}: the top level must be a mapping of sections {SECTIONS}")
    for item in overrides:
        apply_override(raw, item)
    spec = parse_sweep(raw)
    # the env as resolved (FrozenLake-v1 -> qworld/FrozenLake-v1, a file's path absolute), so the
    # experiment's sweep.yaml names the same env wherever resume runs
    raw["env"] = {"id": spec.env.id, **dict(spec.env.kwargs)}
    if isinstance(raw.get("sweep"), dict) and ("path" in spec.sweep or "cases" in spec.sweep):
        for axis in ("path", "cases"):  # a file MDP's path swept: absolute, as above
            if axis in spec.sweep:
                raw["sweep"][axis] = [dict(v) if isinstance(v, Mapping) else v for v in spec.sweep[axis]]
    return dataclasses.replace(spec, source=yaml.safe_dump(raw, sort_keys=False))


def apply_override(raw: dict, item: str) -> None:
    """``agent.lr=0.001`` -> raw["agent"]["lr"] = 0.001 (the value parsed as YAML)."""
    if "=" not in item:
        raise SweepSpecError(f"--set {item!r}: expected KEY=VALUE, e.g. stop.env_steps=10000")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if parts[0] not in SECTIONS:
        guesses = [f"--set {section}.{key}={value}" for section in _sections_with(parts[0])]
        hint = f"; did you mean {' or '.join(guesses)}?" if guesses else ""
        raise SweepSpecError(f"--set {key}: unknown section {parts[0]!r}; allowed: {SECTIONS}{hint}")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SweepSpecError(f"--set {key}: {part!r} is not a mapping")
    node[parts[-1]] = yaml.safe_load(value)


def _sections_with(key: str) -> list[str]:
    """The sections that have a field ``key`` (``lr`` -> ``["agent"]``), for a hint."""
    fields = {
        "goals": [f.name for f in dataclasses.fields(GoalsSpec)],
        "agent": list(_agent_keywords()),
        "sweep": [*ENV_AXES, *GOAL_AXES, *TRIAL_AXES, "cases"],
        "stop": list(STOP_KEYS),
        "checkpoint": ["every", "at_end"],
        "extract": ["methods", "tasks", "options"],
        "resources": [f.name for f in dataclasses.fields(ResourcesSpec)],
        "wandb": ["project", "group", "mode"],
    }
    return [section for section, names in fields.items() if key in names]


def parse_sweep(raw: Mapping[str, Any]) -> SweepSpec:
    """Validate a sweep mapping (already parsed YAML) into a :class:`SweepSpec`."""
    raw = copy.deepcopy(dict(raw))
    _no_unknown(raw, SECTIONS, "")
    name = raw.get("name")
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SweepSpecError(f"name: {name!r} must be a non-empty string of letters, digits, _ or -")

    env = _section(raw, "env", required=True)
    env = dict(env)
    env_id = env.pop("id", None)
    env_ids = _env_ids()
    if env_id not in env_ids and isinstance(env_id, str):
        from qworld_envs import resolve_finite_env

        try:  # a tabular gymnasium id (FrozenLake-v1) or an .npz file
            env_id, env = resolve_finite_env(env_id, env)
        except ValueError:
            pass
    elif env_id in _finite_env_ids():
        from qworld_envs import resolve_finite_env

        env_id, env = resolve_finite_env(env_id, env)  # a file's path made absolute
    if env_id not in env_ids:
        raise SweepSpecError(f"env.id: {env_id!r} is not a known env; allowed: {sorted(env_ids)}, the gymnasium "
                             "id of a tabular env (FrozenLake-v1, CliffWalking-v1, Taxi-v3, ...) or an .npz MDP file")
    env_spec = EnvSpec(id=env_id, kwargs=env)

    goals_raw = _section(raw, "goals")
    _no_unknown(goals_raw, [f.name for f in dataclasses.fields(GoalsSpec)], "goals.")
    goals = GoalsSpec(**goals_raw)
    if goals.goal_cells is not None:
        goals = dataclasses.replace(goals, goal_cells=tuple(tuple(c) for c in goals.goal_cells))

    agent = dict(_section(raw, "agent"))
    agent_keys = _agent_keywords()
    _no_unknown(agent, agent_keys, "agent.")
    for reserved in ("env_id", "env_kwargs"):
        if reserved in agent:
            raise SweepSpecError(f"agent.{reserved}: set the task in the env/goals sections")

    sweep_raw = dict(_section(raw, "sweep"))
    env_axes = env_axes_of(env_id)
    allowed_axes = ("cases",) + env_axes + GOAL_AXES + TRIAL_AXES + tuple(sorted(agent_keys))
    _no_unknown(sweep_raw, allowed_axes, "sweep.")
    sweep = {}
    for axis, values in sweep_raw.items():
        if axis == "cases":
            sweep[axis] = _parse_cases(values, sweep_raw, agent_keys, env_axes)
            if env_id in _finite_env_ids():  # a file's path, as the env section's, made absolute
                sweep[axis] = tuple(_absolute_path(env_id, c) for c in sweep[axis])
            continue
        if isinstance(values, dict) and "grid_search" in values:
            values = values["grid_search"]
        if not isinstance(values, list) or not values:
            raise SweepSpecError(f"sweep.{axis}: {values!r} must be a non-empty list of values")
        if len(set(map(repr, values))) != len(values):
            raise SweepSpecError(f"sweep.{axis}: {values!r} has repeated values")
        if axis == "path" and env_id in _finite_env_ids():
            values = [_absolute_path(env_id, {"path": v})["path"] for v in values]
        sweep[axis] = tuple(values)

    stop = dict(_section(raw, "stop") or {K.ENV_STEPS: 100_000})
    if not stop:
        raise SweepSpecError(f"stop: give at least one of {sorted(STOP_KEYS)}")
    for key, value in stop.items():
        if key not in STOP_KEYS:
            raise SweepSpecError(f"stop.{key}: not a metric Tune can stop on; allowed: {sorted(STOP_KEYS)}")
        _positive(value, f"stop.{key}")

    ckpt_raw = _section(raw, "checkpoint")
    _no_unknown(ckpt_raw, ("every", "at_end"), "checkpoint.")
    checkpoint = CheckpointSpec(**ckpt_raw)
    if not isinstance(checkpoint.every, int) or checkpoint.every < 0:
        raise SweepSpecError(f"checkpoint.every: {checkpoint.every!r} must be an integer >= 0 (0 = only at the end)")
    if checkpoint.every == 0 and not checkpoint.at_end:
        raise SweepSpecError("checkpoint: every=0 and at_end=false would write no checkpoint to score")

    extract_raw = dict(_section(raw, "extract"))
    _no_unknown(extract_raw, ("methods", "tasks", "options"), "extract.")
    methods_raw = extract_raw.get("methods", ExtractSpec.methods)
    per_algorithm: dict[str, tuple[str, ...]] = {}
    if isinstance(methods_raw, Mapping):
        from qworld.agents.families import ALGORITHMS

        for name, listed in methods_raw.items():
            if name not in ALGORITHMS:
                raise SweepSpecError(f"extract.methods.{name}: not a learner family; allowed: {sorted(ALGORITHMS)}")
            if not isinstance(listed, (list, tuple)) or not listed:
                raise SweepSpecError(f"extract.methods.{name}: {listed!r} must be a non-empty list of methods")
            per_algorithm[name] = tuple(listed)
        methods_raw = list(dict.fromkeys(m for listed in per_algorithm.values() for m in listed))
    elif not isinstance(methods_raw, (list, tuple)):
        raise SweepSpecError(f"extract.methods: {methods_raw!r} must be a list of methods, or a mapping "
                             "learner family -> list")
    extract = ExtractSpec(
        methods=tuple(methods_raw),
        tasks=_parse_tasks(extract_raw.get("tasks", ())),
        options=extract_raw.get("options", {}) or {},
        per_algorithm=per_algorithm,
    )

    res_raw = _section(raw, "resources")
    _no_unknown(res_raw, [f.name for f in dataclasses.fields(ResourcesSpec)], "resources.")
    resources = ResourcesSpec(**res_raw)
    _positive(resources.cpus_per_trial, "resources.cpus_per_trial")
    if not isinstance(resources.gpus_per_trial, (int, float)) or resources.gpus_per_trial < 0:
        raise SweepSpecError(f"resources.gpus_per_trial: {resources.gpus_per_trial!r} must be >= 0")
    if not isinstance(resources.plearn_actors, int) or resources.plearn_actors < 1:
        raise SweepSpecError(f"resources.plearn_actors: {resources.plearn_actors!r} must be an integer >= 1")
    if not isinstance(resources.max_failures, int) or resources.max_failures < 1:
        raise SweepSpecError(f"resources.max_failures: {resources.max_failures!r} must be an integer >= 1")

    wandb_raw = _section(raw, "wandb")
    _no_unknown(wandb_raw, ("project", "group", "mode"), "wandb.")
    wandb_spec = WandbSpec(**wandb_raw)
    if wandb_spec.mode not in WANDB_MODES:
        raise SweepSpecError(f"wandb.mode: {wandb_spec.mode!r}; allowed: {WANDB_MODES}")

    spec = SweepSpec(name=name, env=env_spec, goals=goals, agent=agent, sweep=sweep, stop=stop,
                     checkpoint=checkpoint, extract=extract, resources=resources, wandb=wandb_spec)
    _validate_cells(spec)
    return spec


# --------------------------------------------------------------------------------------
# per-cell checks: the task each grid cell would train on must exist


def _validate_cells(spec: SweepSpec) -> None:
    from qworld_envs import GOAL_TYPES, make_finite_problem

    finite = spec.env.id in _finite_env_ids()
    methods, tasks = _allowed_methods_and_tasks(spec.env.id, finite)
    for m in spec.extract.methods:
        if m not in methods:
            raise SweepSpecError(f"extract.methods: {m!r} is not an extraction method for {spec.env.id}; allowed: {methods}")
    for t in spec.extract.tasks:
        if isinstance(t, str) and t not in tasks:
            raise SweepSpecError(f"extract.tasks: {t!r} is not a task for {spec.env.id}; allowed: {tasks}"
                                 + (" or a task defined as {name, start, goal, forbidden}" if finite else ""))
        if not isinstance(t, str) and not finite:
            raise SweepSpecError(f"extract.tasks: {t.name!r}: tasks defined by states are for finite envs; "
                                 f"allowed for {spec.env.id}: {tasks}")
    for m in spec.extract.options:
        if m not in spec.extract.methods:
            raise SweepSpecError(f"extract.options.{m}: options for a method not in extract.methods {spec.extract.methods}")
        opts = spec.extract.options[m]
        if not finite and ("planner" in opts or "mpc" in opts):  # the unseen-goal planner of the method's rows
            from qworld.worldmodel.planning_continuous import PLANNERS, MPCConfig

            if opts.get("planner", "grid") not in PLANNERS:
                raise SweepSpecError(f"extract.options.{m}.planner: {opts['planner']!r}; allowed: {PLANNERS}")
            try:
                MPCConfig.from_options(opts.get("mpc"))
            except (TypeError, ValueError) as exc:
                raise SweepSpecError(f"extract.options.{m}.mpc: {exc}") from None

    if spec.extract.per_algorithm:
        from qworld.agents.families import ALGORITHM_KEY, DEFAULT_ALGORITHM

        for cell in spec.cells():
            name = {**spec.agent, **cell}.get(ALGORITHM_KEY) or DEFAULT_ALGORITHM
            if name not in spec.extract.per_algorithm:
                raise SweepSpecError(f"extract.methods: no methods for the family {name!r} of grid cell {cell}; "
                                     f"given for {sorted(spec.extract.per_algorithm)}")
    for cell in spec.cells():
        where = f" (grid cell {cell})" if cell else ""
        env_id, env_kwargs, agent = spec.cell_config(cell)
        if finite:
            goal_type = env_kwargs.get("goal_type")
            if goal_type not in GOAL_TYPES:
                field_name = "sweep.goal_type" if "goal_type" in cell else "goals.goal_type"
                raise SweepSpecError(f"{field_name}: {goal_type!r}{where}; allowed: {GOAL_TYPES}")
            num_goals = env_kwargs.get("num_goals")
            field_name = "sweep.num_goals" if "num_goals" in cell else "goals.num_goals"
            if num_goals is not None and (not isinstance(num_goals, int) or num_goals < 1):
                raise SweepSpecError(f"{field_name}: {num_goals!r}{where} must be a positive integer")
            try:
                S = make_finite_problem(env_id, **{**_env_kwargs_for_task(env_kwargs), "num_goals": None,
                                                "goal_cells": None}).mdp.num_states
            except (ValueError, TypeError, KeyError) as exc:
                raise SweepSpecError(f"env{where}: {exc}") from None
            if K.GOAL_INFERENCE in spec.extract.tasks and (goal_type != "indicator" or (num_goals or S) < 2):
                bad = ("sweep.goal_type" if "goal_type" in cell else "goals.goal_type") if goal_type != "indicator" \
                    else field_name
                raise SweepSpecError(f"{bad}: {goal_type if goal_type != 'indicator' else num_goals!r}{where}: "
                                     f"extract.tasks {K.GOAL_INFERENCE!r} names indicator goal cells held out of "
                                     "the others; allowed: goal_type indicator with num_goals >= 2")
            if goal_type == "indicator" and num_goals is not None and num_goals > S:
                raise SweepSpecError(f"{field_name}: {num_goals}{where} indicator goals but {spec.env.id} has only {S} states; allowed 1..{S}")
            try:
                problem = make_finite_problem(env_id, **_env_kwargs_for_task(env_kwargs))
            except (ValueError, TypeError, KeyError) as exc:
                raise SweepSpecError(f"goals{where}: {exc}") from None
            _validate_finite_extract(spec, problem.mdp, where)
        else:
            try:
                import gymnasium

                gymnasium.make(env_id, **_env_kwargs_for_task(env_kwargs)).close()
            except Exception as exc:  # noqa: BLE001 - any construction failure is a spec error
                raise SweepSpecError(f"env/goals{where}: {env_id} cannot be built: {exc}") from None
        _validate_agent(agent, where, cell, env_id)


def _validate_finite_extract(spec: SweepSpec, mdp: Any, where: str) -> None:
    """Every method can run on the cell's MDP (``moves`` needs grid coordinates) and every
    planning task names states of it."""
    from qworld.worldmodel import experience
    from qworld.worldmodel.planning import task_name, task_states
    from qworld.worldmodel.plearn.finite import method_options

    for m in spec.extract.methods:
        if m in experience.FINITE_METHODS:
            continue
        try:
            method_options(m, mdp.P, mdp.coords)
        except ValueError as exc:
            raise SweepSpecError(f"extract.methods: {m!r} cannot run on {spec.env.id}{where}: {exc}") from None
    from qworld.worldmodel.plearn.finite import check_options

    for m, opts in spec.extract.options.items():
        if m in experience.FINITE_METHODS:
            continue
        try:
            check_options(m, opts)
        except ValueError as exc:
            raise SweepSpecError(f"extract.options.{m}: {exc}") from None
    for i, t in enumerate(spec.extract.tasks):
        if task_name(t) in _inference_tasks():
            continue
        try:
            task_states(mdp, t)
        except ValueError as exc:
            raise SweepSpecError(f"extract.tasks[{i}].{exc}{where}") from None


def _inference_tasks() -> tuple[str, ...]:
    from qworld.worldmodel.reward import INFERENCE_TASKS

    return tuple(INFERENCE_TASKS)


def _parse_tasks(raw: Any) -> tuple:
    """``extract.tasks``: names, and tasks defined by states (``planning.PlanningTask``)."""
    from qworld.worldmodel.planning import PlanningTask, task_name

    if not isinstance(raw, (list, tuple)):
        raise SweepSpecError(f"extract.tasks: {raw!r} must be a list of task names or task mappings "
                             "{name, start, goal, forbidden}")
    tasks = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            tasks.append(item)
            continue
        try:
            tasks.append(PlanningTask.from_mapping(item))
        except ValueError as exc:
            raise SweepSpecError(f"extract.tasks[{i}].{exc}") from None
    names = [task_name(t) for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SweepSpecError(f"extract.tasks: the name {repeated[0]!r} is used twice; each task needs its own name")
    return tuple(tasks)


def _env_kwargs_for_task(env_kwargs: Mapping[str, Any]) -> dict:
    return {k: v for k, v in env_kwargs.items() if v is not None or k != "num_goals"}


def _validate_agent(agent: Mapping[str, Any], where: str, cell: Mapping[str, Any] = (), env_id: str | None = None) -> None:
    """The cell's learner family exists, accepts every agent keyword it is given, and runs on
    the cell's env (e.g. d3g refuses finite envs)."""
    from qworld.agents.families import ALGORITHM_KEY, ALGORITHMS, family

    def field_name(key):
        return f"sweep.{key}" if key in cell else f"agent.{key}"

    agent = dict(agent)
    name = agent.pop(ALGORITHM_KEY, None)
    try:
        fam = family(name)
    except ValueError:
        raise SweepSpecError(f"{field_name(ALGORITHM_KEY)}: {name!r}{where} is not a learner family; "
                             f"allowed: {sorted(ALGORITHMS)}") from None
    accepted = fam.keywords()
    for key in agent:
        if key not in accepted:
            raise SweepSpecError(f"{field_name(key)}: not a keyword of algorithm {fam.name!r}{where}; "
                                 f"allowed: {sorted(k for k in accepted if k not in ('env_id', 'env_kwargs'))}")
    config = fam.config_class()()
    try:
        config.training(**({"env_id": env_id} if env_id else {}), **agent)
    except (ValueError, TypeError) as exc:
        raise SweepSpecError(f"agent{where}: {exc}") from None
    errors = config.qworld_errors()
    if errors:
        raise SweepSpecError(f"agent.{errors[0]}{where}")


# --------------------------------------------------------------------------------------
# small helpers


def env_axes_of(env_id: Any) -> tuple[str, ...]:
    """Env kwargs a sweep may grid over: ``ENV_AXES`` and a finite env's own kwargs
    (``FrozenLake-v1``: ``map_name``, ``is_slippery``, ...; ``qworld/TabularMDP-v0``: ``path``)."""
    from qworld_envs import FINITE_ENVS

    spec = FINITE_ENVS.get(env_id) if isinstance(env_id, str) else None
    return ENV_AXES + (tuple(k for k in spec.mdp_defaults if k not in ENV_AXES) if spec else ())


def _absolute_path(env_id: str, kwargs: Mapping[str, Any]) -> dict:
    """``kwargs`` with a file MDP's ``path`` made absolute (trials run in their own folders)."""
    from qworld_envs import resolve_finite_env

    kwargs = dict(kwargs)
    if "path" not in kwargs:
        return kwargs
    _, resolved = resolve_finite_env(env_id, {"path": kwargs["path"]})
    return {**kwargs, "path": resolved["path"]}


def _parse_cases(cases: Any, sweep_raw: Mapping[str, Any], agent_keys=(), env_axes=ENV_AXES) -> tuple[dict, ...]:
    """``sweep.cases``: explicit env/goal cells, e.g. each variant with its own goal counts.

    A case may also set agent keywords that belong to it (e.g. ``gamma`` for dense goals);
    an axis is either inside the cases or a sweep axis, never both.
    """
    allowed = env_axes + GOAL_AXES + tuple(sorted(agent_keys))
    if not isinstance(cases, list) or not cases or not all(isinstance(c, dict) and c for c in cases):
        raise SweepSpecError(f"sweep.cases: {cases!r} must be a non-empty list of mappings over {allowed}")
    for i, case in enumerate(cases):
        _no_unknown(case, allowed, f"sweep.cases[{i}].")
    in_cases = {k for case in cases for k in case}
    outside = [a for a in sweep_raw if a in env_axes + GOAL_AXES or (a != "cases" and a in in_cases)]
    if outside:
        raise SweepSpecError(f"sweep.{outside[0]}: with sweep.cases, env/goal axes (and any axis a case sets) go inside the cases")
    if len(set(map(repr, cases))) != len(cases):
        raise SweepSpecError("sweep.cases: repeated cases")
    env_parts = [repr(sorted((k, v) for k, v in c.items() if k in env_axes + GOAL_AXES)) for c in cases]
    if len(set(env_parts)) != len(cases):
        raise SweepSpecError("sweep.cases: two cases share their env/goal keys (a case is named by them; "
                             "vary agent keywords as sweep axes instead)")
    return tuple(dict(c) for c in cases)


def _section(raw: Mapping[str, Any], key: str, required: bool = False) -> dict:
    value = raw.get(key)
    if value is None:
        if required:
            raise SweepSpecError(f"{key}: this section is required")
        return {}
    if not isinstance(value, dict):
        raise SweepSpecError(f"{key}: must be a mapping, got {type(value).__name__} {value!r}")
    return value


def _no_unknown(mapping: Mapping[str, Any], allowed, prefix: str) -> None:
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        raise SweepSpecError(f"{prefix}{unknown[0]}: unknown key; allowed: {sorted(allowed)}")


def _positive(value: Any, field_name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise SweepSpecError(f"{field_name}: {value!r} must be a positive number")


def _env_ids() -> set[str]:
    import gymnasium
    import qworld_envs  # noqa: F401 - registers the qworld/ ids

    return {k for k in gymnasium.registry if k.startswith("qworld/")}


def _finite_env_ids() -> set[str]:
    from qworld_envs import FINITE_ENVS

    return set(FINITE_ENVS)


def _allowed_methods_and_tasks(env_id: str, finite: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Methods that extract from Q, then the explicit models beside them (qworld.worldmodel.experience).
    from qworld.worldmodel import experience

    if finite:
        from qworld.worldmodel.planning import SAFETY_TASKS
        from qworld.worldmodel.plearn.finite import METHODS
        from qworld.worldmodel.reward import INFERENCE_TASKS

        return tuple(METHODS) + experience.FINITE_METHODS, tuple(SAFETY_TASKS) + INFERENCE_TASKS
    from qworld_envs.continuous_tasks import UNSEEN_GOAL_TASKS
    from qworld.worldmodel.plearn.continuous import METHODS as CMETHODS

    return tuple(CMETHODS) + experience.CONTINUOUS_METHODS, tuple(UNSEEN_GOAL_TASKS.get(env_id, ()))


def _agent_keywords() -> tuple[str, ...]:
    """Agent keywords of any learner family, and ``algorithm`` (each cell's family is
    checked against its own keywords in ``_validate_agent``)."""
    from qworld.agents.families import all_keywords

    return all_keywords()


def cluster_address(address: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The address of the existing Ray cluster qworld will join, or None when it starts its own.

    An explicit ``--address`` wins; otherwise ``$RAY_ADDRESS``, which Ray sets for every job
    driver (``ray job submit``) and which ``ray.init`` reads the same way. ``local`` (either
    way) asks for a new local Ray, so it is no cluster.
    """
    env = os.environ if environ is None else environ
    chosen = address if address else env.get("RAY_ADDRESS") or None
    return None if chosen is None or chosen.strip().lower() == "local" else chosen


def check_local_resources(spec: SweepSpec, address: str | None, gpus_found: int | None = None,
                          environ: Mapping[str, str] | None = None) -> None:
    """Refuse a sweep that cannot run on the local Ray it would start: a trial asking for a
    GPU on a machine with none stays PENDING forever. Joining a cluster skips the check (its
    nodes, not this machine, hold the GPUs): an explicit ``address``, or ``$RAY_ADDRESS`` as
    inside a Ray job, whose driver may well land on a CPU-only head (``cluster_address``).

    Raises:
        SweepSpecError: naming ``resources.gpus_per_trial`` and the GPUs found.
    """
    if cluster_address(address, environ) is not None or spec.resources.gpus_per_trial <= 0:
        return
    if gpus_found is None:
        import torch

        gpus_found = torch.cuda.device_count()
    if gpus_found == 0:
        raise SweepSpecError(
            f"resources.gpus_per_trial: {spec.resources.gpus_per_trial} but the local Ray would have "
            f"{gpus_found} GPUs (torch.cuda.device_count() on this machine); set it to 0, or pass "
            "--address of a cluster that has GPUs (or run inside a Ray job)")
