"""Where a checkpoint is scored, for finite and continuous envs alike.

:func:`score_checkpoint` loads Q out of a checkpoint and :func:`score_q` scores a loaded
agent: the agent's Q error, a world model extracted by every method (``qworld.worldmodel.plearn``),
its error against the true dynamics (``qworld.worldmodel.scoring`` / ``qworld.worldmodel.scoring_continuous``)
and planning with it (``qworld.worldmodel.planning`` / ``qworld.worldmodel.planning_continuous``). One row per
extraction method. Nothing raises out of here: a method that fails gives a row with its
``error`` filled in, a failure shared by every method (e.g. a diverged agent whose Q is NaN)
gives every method's row that error, and a checkpoint that cannot be read gives one row with
``method = "load"``, so a sweep goes on past any checkpoint.

No Ray here: the P-learning actor, ``qworld extract``, benchmarks and tests all call it.
"""

from __future__ import annotations

import re
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from qworld import metrics as K

def checkpoint_index(checkpoint_path: str | Path) -> int:
    """Tune names checkpoints ``checkpoint_000007``; the number is the index."""
    match = re.search(r"checkpoint_(\d+)", str(checkpoint_path))
    if not match:
        raise ValueError(f"cannot read a checkpoint index from {checkpoint_path!r}")
    return int(match.group(1))


def checkpoint_uid(checkpoint_path: str | Path) -> str | None:
    """The identity a checkpoint was saved with (``qworld_config.json``'s ``checkpoint_uid``;
    None for a checkpoint saved before uids, or one that cannot be read). Every row scored
    from the checkpoint carries it, the row of an unreadable checkpoint included."""
    import json

    from qworld.layout import CHECKPOINT_CONFIG_FILE
    from qworld.sweep.location import Location

    try:
        config = json.loads((Location.of(checkpoint_path) / CHECKPOINT_CONFIG_FILE).read_text())
    except Exception:  # noqa: BLE001 - unreadable: the load row says why
        return None
    uid = config.get(K.CHECKPOINT_UID) if isinstance(config, dict) else None
    return str(uid) if uid else None


def grid_columns(sweep: str, trial_id: str, config: Mapping[str, Any], seed: Any = None) -> dict:
    """The grid-cell columns of a row, read from a trial's resolved config."""
    env_kwargs = dict(config.get("env_kwargs") or {})

    def pick(key):  # the resolved value (e.g. num_goals=None resolved to L) wins
        value = config.get(key)
        return env_kwargs.get(key) if value is None else value

    return {
        K.SWEEP: sweep,
        K.TRIAL_ID: trial_id,
        K.ENV: config.get("env_id"),
        K.ALGORITHM: str(config.get(K.ALGORITHM) or "pqn").lower(),  # no key: a PQN checkpoint
        K.VARIANT: pick(K.VARIANT),
        K.GOAL_TYPE: pick(K.GOAL_TYPE),
        K.NUM_GOALS: pick(K.NUM_GOALS),
        K.HEAD: config.get("head"),
        K.SEED: seed if seed is not None else config.get("seed"),
    }


def score_checkpoint(
    checkpoint_path: str | Path,
    *,
    sweep: str,
    trial_id: str,
    methods: Sequence[str] | Mapping[str, Sequence[str]],
    tasks: Sequence[str] = (),
    options: Mapping[str, Mapping[str, Any]] | None = None,
    env_steps: int | None = None,
    seed: Any = None,
    world_models: dict | None = None,
) -> list[dict]:
    """Rows of (trial, checkpoint, method): :func:`score_q` of the checkpoint's agent, with
    the grid-cell columns of its config and ``checkpoint_index`` / ``checkpoint_uid`` /
    ``env_steps``.

    ``methods`` is a list, or learner family -> list (the checkpoint's family picks its own).
    """
    index = checkpoint_index(checkpoint_path)
    base = {K.SWEEP: sweep, K.TRIAL_ID: trial_id, K.CHECKPOINT_INDEX: index,
            K.CHECKPOINT_UID: checkpoint_uid(checkpoint_path),
            K.ENV_STEPS: env_steps, K.CHECKPOINT_PATH: str(checkpoint_path)}
    try:
        from qworld.agents import load_q
        from qworld.worldmodel.experience import load_experience

        qfun = load_q(checkpoint_path)
        config = dict(qfun.config)
        experience = load_experience(checkpoint_path)
    except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint is data, not a crash
        return [{**base, K.METHOD: K.LOAD_METHOD, K.ERROR: _error_text(exc)}]
    base = {**grid_columns(sweep, trial_id, config, seed), **base}
    if isinstance(methods, Mapping):
        methods = methods.get(base[K.ALGORITHM], ())
    return score_q(qfun, base, methods, tasks, options, world_models=world_models, experience=experience)


def score_q(qfun: Any, base: Mapping[str, Any], methods: Sequence[str], tasks: Sequence[str] = (),
            options: Mapping[str, Mapping[str, Any]] | None = None, *,
            world_models: dict | None = None, experience: Any = None) -> list[dict]:
    """Rows of (checkpoint, method) for a loaded agent: Q error, world-model scores, plans.

    Args:
        qfun: the agent, a ``qworld.agents.QFunction`` (``.config`` is its resolved trial
            config: ``env_id``, ``env_kwargs``, ``gamma``).
        base: columns every row carries.
        methods: extraction methods (``plearn.finite.METHODS`` or ``plearn.continuous.METHODS``)
            and explicit models (``experience.FINITE_METHODS`` / ``CONTINUOUS_METHODS``).
        tasks: planning tasks (``planning.SAFETY_TASKS`` or the env's ``UNSEEN_GOAL_TASKS``) and,
            on finite envs, ``reward.GOAL_INFERENCE``: each goal named from its own Q and the
            method's model built without it (columns ``goal_inference/<score>``).
        options: per method, its options (finite: ``extract`` keywords; continuous:
            ``PLearnConfig`` fields plus the unseen-goal planning's ``grid_shape``,
            ``num_resets``, ``planner`` and ``mpc``, see ``evaluate_unseen_goal``); continuous
            envs also read ``options["q_nmse"]["grid_shape"]`` (0 / None skips the Q NMSE).
        world_models: if given, receives method -> the extracted model of every successful
            extraction: ``P_hat[S, A, S]`` (finite) or the ``PLearnResult`` (continuous).
        experience: the trial's ``qworld.worldmodel.experience.ExperienceLog`` up to this checkpoint, or
            None: the ``supervised`` / ``qss`` methods need it; with it every row also gets
            the ``rare/`` scores (and finite rows ``unvisited_fraction``).
    """
    from qworld_envs import FINITE_ENVS

    config = dict(qfun.config)
    score = _score_finite if config.get("env_id") in FINITE_ENVS else _score_continuous
    try:
        return score(qfun, config, dict(base), methods, tasks, dict(options or {}), world_models, experience)
    except Exception as exc:  # noqa: BLE001 - e.g. a diverged agent (NaN Q): rows, not a stopped sweep
        if world_models is not None:
            world_models.clear()  # no model of this checkpoint is kept without its row
        return [{**base, K.METHOD: method, K.ORACLE: method in K.ORACLE_METHODS, K.ERROR: _error_text(exc)}
                for method in methods]


def _score_finite(qfun, config, base, methods, tasks, options, world_models, experience) -> list[dict]:
    from qworld.worldmodel.bellman import greedy_policy, m_matrix, solve_goal_q
    from qworld.worldmodel.experience import FINITE_METHODS, RARE_VISITS, finite_model
    from qworld.layout import DEMONSTRATIONS_DIR, VALUE_TEMPERATURE
    from qworld.worldmodel.planning import task_name, task_optimal_plan
    from qworld.worldmodel.plearn.diagnose import diagnose
    from qworld.worldmodel.plearn.finite import extract, method_options, trained_q_mask
    from qworld.worldmodel.reward import state_values
    from qworld.worldmodel.scoring import (extract_and_plan, misspecification, nmse, policy_success, score_and_plan,
                                           score_p)
    from qworld_envs import make_finite_problem

    problem = make_finite_problem(config["env_id"], **config["env_kwargs"])
    P, goals = problem.mdp.P, problem.goals
    gamma = float(config["gamma"])
    Q = np.asarray(qfun.q_table(), dtype=np.float64)  # [L, S, A]
    # greedy V, the reference code's choice; a soft learner's (IQ-Learn) Q satisfies the soft one
    temperature = float(config[VALUE_TEMPERATURE]) if config.get(VALUE_TEMPERATURE) else None
    V = state_values(Q, "soft", temperature) if temperature else Q.max(axis=-1)
    M = m_matrix(goals.rewards, V, gamma, goals.terminal)
    # The agent's Q is scored against the exact Q of its own greedy policy.
    Q_pi, _ = solve_goal_q(P, goals.rewards, gamma, goals.terminal, policy=greedy_policy(Q))
    # Only the Q-values the agent is trained on: at a state terminal for the goal it never acts.
    q_mask = trained_q_mask(goals.terminal)  # [L, S]
    # Identifiability of this case from this agent: the case's structure (deterministic or
    # not) is read off the true P, and M is known only up to the agent's Q error, so columns
    # closer than twice that error count as equal (the column-matching margin).
    deterministic = bool(np.all((P > 0).sum(-1) == 1))
    diag = diagnose(M, deterministic=deterministic, gap_tol=2.0 * float(np.abs(Q - Q_pi)[q_mask].max()))
    shared = {**base, K.Q_NMSE: float(nmse(Q[q_mask], Q_pi[q_mask])),
              **{k: diag[k] for k in (K.M_RANK, K.M_COND, K.M_GAP, K.IDENTIFIABLE_CASE, K.IDENTIFIABLE_REASON)}}
    if goals.success.any():  # sparse goals: how often the agent's policy gets there, and the optimum's
        Q_star, _ = solve_goal_q(P, goals.rewards, gamma, goals.terminal)
        horizon = problem.max_episode_steps
        shared[K.POLICY_SUCCESS] = float(np.nanmean(policy_success(P, Q, goals.terminal, horizon, goals.success)))
        shared[f"{K.STAR}/{K.POLICY_SUCCESS}"] = float(np.nanmean(
            policy_success(P, Q_star, goals.terminal, horizon, goals.success)))
    scored = ~problem.mdp.terminal  # rows no Q constrains (the env's terminal states) are left out

    rare = None
    if experience is not None and experience.finite:
        visits = experience.visits()
        rare = (visits < RARE_VISITS) & scored[:, None]
        shared[K.UNVISITED_FRACTION] = float((visits[scored] == 0).mean())
        shared[f"{K.RARE}/{K.FRACTION}"] = float(rare[scored].mean())

    M_recovered = None
    if config.get(DEMONSTRATIONS_DIR):  # an imitation learner: the rewards it recovered, and M with them
        M_recovered, shared[f"{K.DEMONSTRATIONS}/{K.REWARD_PEARSON}"] = recovered_m(
            Q, V, config[DEMONSTRATIONS_DIR], gamma, temperature, goals.num_goals)

    # The reference plan of each task in the true MDP: once per checkpoint, not per method.
    optimal = {t: task_optimal_plan(problem.mdp, t, gamma) for t in tasks if task_name(t) != K.GOAL_INFERENCE}
    rows = []
    for method in methods:
        row = {**shared, K.METHOD: method, K.ORACLE: method in K.ORACLE_METHODS, K.ERROR: None}
        try:
            explicit = method in FINITE_METHODS  # a model of the trial's experience, not of Q
            if explicit:
                start = time.perf_counter()
                P_hat, _ = finite_model(method, experience)
                seconds = time.perf_counter() - start  # the fit only, as extract_and_plan times it
                scores, plans = score_and_plan(P_hat, problem.mdp, gamma, optimal)
                scores[K.FIT_SECONDS] = seconds
            else:
                opts = {**method_options(method, P, problem.mdp.coords), **options.get(method, {})}
                P_hat, scores, plans = extract_and_plan(Q, M, problem.mdp, method, opts, gamma, optimal, q_mask)
            if M_recovered is not None and not explicit:
                P_rec = extract(Q, M_recovered, method, q_mask=q_mask, **opts)
                row.update({f"{K.RECOVERED}/{k}": v for k, v in score_p(P_rec[scored], P[scored]).items()})
            if K.GOAL_INFERENCE in tasks:
                plans[K.GOAL_INFERENCE] = goal_inference(Q, M, goals, gamma, P_hat if explicit else None,
                                                       method, None if explicit else opts, q_mask)
            if world_models is not None:
                world_models[method] = P_hat
            row.update(scores)
            row.update(misspecification(Q, M, P_hat, P, scored, q_mask=q_mask))  # the model explains Q, or is flagged
            if rare is not None and rare.any():  # where the agent has (almost) no data of its own
                row.update({f"{K.RARE}/{k}": v for k, v in score_p(P_hat[rare][:, None], P[rare][:, None]).items()})
            row.update({f"{name}/{k}": v for name, plan in plans.items() for k, v in plan.items()})
        except Exception as exc:  # noqa: BLE001 - one method failing must not lose the others
            row[K.ERROR] = _error_text(exc)
        rows.append(row)
    return rows


def recovered_m(Q: np.ndarray, V: np.ndarray, demo_dir: str, gamma: float, temperature: float | None,
                num_goals: int) -> tuple[np.ndarray, float]:
    """``M [L, S]`` built with the rewards an imitation learner recovered instead of the true
    ones, and their Pearson correlation with the truth over the demonstrations.

    The recovered reward of each demonstration transition is IQ-Learn's
    ``Q(s, a) - gamma (1 - done) V(s')`` (soft V at ``temperature``, else greedy); averaged per
    (goal, arrival state) it is the arrival reward M takes, the terminal states those the
    demonstrations ended in (``reward.arrival_rewards``). Only the demonstrations are read:
    no true reward enters M.
    """
    from qworld.worldmodel.bellman import m_matrix
    from qworld.demonstrations import read_demonstrations
    from qworld.worldmodel.reward import arrival_rewards, transition_rewards

    demo = read_demonstrations(demo_dir)
    kind = "soft" if temperature else "greedy"
    r = transition_rewards(Q, demo["goal"], demo["state"], demo["action"], demo["next_state"], demo["terminated"],
                           gamma, kind=kind, alpha=temperature or 1.0)
    pearson = float(np.corrcoef(r, demo["reward"])[0, 1]) if np.ptp(r) > 0 and np.ptp(demo["reward"]) > 0 \
        else float("nan")
    r_hat, terminal_hat, _ = arrival_rewards(r, demo["goal"], demo["next_state"], demo["terminated"], num_goals,
                                             Q.shape[1])
    return m_matrix(r_hat, V, gamma, terminal_hat), pearson


def goal_inference(Q: np.ndarray, M: np.ndarray, goals: Any, gamma: float, P_hat: np.ndarray | None,
                   method: str, options: Mapping[str, Any] | None, q_mask: np.ndarray | None = None) -> dict:
    """``reward.goal_inference_scores`` of one method: each indicator goal named from its own Q
    and a model it never helped build -- ``P_hat`` itself when the model holds no goal (an
    explicit model), else the method re-run on the other L - 1 goals' Q and M."""
    from qworld.worldmodel.reward import goal_inference_scores, held_out_models

    if goals.goal_states is None or goals.num_goals < 2:
        raise ValueError(f"goal_inference names indicator goal cells held out of L >= 2 goals; this agent has "
                         f"{goals.num_goals} goal(s) of type {goals.goal_type!r}")
    model_for = (lambda g: P_hat) if P_hat is not None else held_out_models(Q, M, method, options, q_mask)
    return goal_inference_scores(Q, goals.goal_states, gamma, model_for, goals.rewards)


def _score_continuous(qfun, config, base, methods, tasks, options, world_models, experience) -> list[dict]:
    """Q NMSE on the env's planning grid, the agent's own return on its goals
    (``policy_return``, ``policy_success``: ``planning_continuous.policy_returns``, its keywords in
    ``options["policy_return"]``), world-model scores with baselines (all and interior
    transitions, ``scoring_continuous.score_world_model``) and per unseen-goal task
    ``<task>/return_ratio``, ``return_wm``, ``return_star``, ``plan_success``."""
    import torch

    from qworld.agents.adapter import agent_q_fn
    from qworld.worldmodel.bellman_grid import GridQ, grid_q_for_problem
    from qworld.worldmodel.experience import CONTINUOUS_METHODS, fit_supervised
    from qworld.worldmodel.planning_continuous import default_grid_shape, evaluate_unseen_goal, policy_returns
    from qworld.worldmodel.plearn.continuous import METHODS, PLearnConfig, p_learn
    from qworld.worldmodel.scoring_continuous import noise_std_scores, nmse_torch, score_world_model
    from qworld_envs import make_continuous_problem

    problem = make_continuous_problem(config["env_id"], **dict(config.get("env_kwargs") or {}))
    gamma = float(config["gamma"])
    q_fn = agent_q_fn(qfun, problem)
    shared = dict(base)
    q_error = None
    q_opts = dict(options.get(K.Q_NMSE, {}))
    q_shape = q_opts.get("grid_shape", default_grid_shape(problem.env_id) if problem.dynamics.differentiable else None)
    if q_shape:
        try:  # the agent's Q against the exact Q of its own greedy policy
            grid_shape = tuple(q_shape)

            def greedy(points: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return torch.stack([q_fn(points.float(), torch.full((len(points),), g)).argmax(-1)
                                        for g in range(problem.goals.num_goals)])

            Q_pi, grid = grid_q_for_problem(problem, grid_shape, gamma, policy=greedy)
            q_pi = GridQ(Q_pi, grid)
            gen = torch.Generator().manual_seed(0)
            s = problem.dynamics.uniform_states(4096, gen)
            g = torch.randint(problem.goals.num_goals, (4096,), generator=gen)
            with torch.no_grad():
                shared[K.Q_NMSE] = nmse_torch(q_fn(s.float(), g).double(), q_pi(s, g).double())
        except Exception as exc:  # noqa: BLE001 - the world-model scores still count
            shared[K.Q_NMSE] = float("nan")
            q_error = f"{K.Q_NMSE}: {_error_text(exc)}"
    try:  # the agent return: its own greedy policy on its training goals, no model involved
        shared.update(policy_returns(q_fn, problem, gamma, **dict(options.get(K.POLICY_RETURN, {}))))
    except Exception as exc:  # noqa: BLE001 - the world-model scores still count
        q_error = "; ".join(filter(None, [q_error, f"{K.POLICY_RETURN}: {_error_text(exc)}"]))
    rare = _rare_states(experience, problem)
    rows = []
    for method in methods:
        row = {**shared, K.METHOD: method, K.ORACLE: method in K.ORACLE_METHODS, K.ERROR: q_error}
        try:
            if method not in METHODS + CONTINUOUS_METHODS:
                raise ValueError(f"unknown continuous method {method!r}; known: {METHODS + CONTINUOUS_METHODS}")
            opts = dict(options.get(method, {}))
            grid_shape = opts.pop("grid_shape", None)
            num_resets = int(opts.pop("num_resets", 512))
            plan_opts = {"planner": opts.pop("planner", "grid"), "mpc": opts.pop("mpc", None)}
            if method == "sampler":
                opts.setdefault("loss", "l2")  # the double-sampled square is unbiased; L1 shrinks the noise
            if method == "forward_model":  # the agent's own model (D3G), not fitted here
                step_fn, seconds = _agent_forward_model(qfun), 0.0
            else:
                cfg = PLearnConfig.from_options(opts)
                if method == "supervised":
                    if experience is None or experience.finite or not experience.num_transitions:
                        raise ValueError("method 'supervised' needs the trial's experience (experience.npz in the "
                                         "checkpoint); this checkpoint has none")
                    fit = fit_supervised(problem, experience.states, experience.actions, experience.next_states, cfg)
                else:
                    fit = p_learn(q_fn, problem, gamma, cfg, stochastic=(method == "sampler"))
                if world_models is not None:
                    world_models[method] = fit
                step_fn, seconds = fit.step_fn(), fit.seconds
            row[K.FIT_SECONDS] = seconds
            row.update(score_world_model(step_fn, problem, interior=True, rare=rare))
            if method == "sampler":
                row.update(noise_std_scores(fit.model.std, problem))
            for name in tasks:
                res = evaluate_unseen_goal(problem, name, step_fn, gamma=gamma, grid_shape=grid_shape,
                                           num_resets=num_resets, **plan_opts)
                row.update({f"{name}/{k}": v for k, v in res.items()})
        except Exception as exc:  # noqa: BLE001 - one method failing must not lose the others
            row[K.ERROR] = _error_text(exc)
        rows.append(row)
    return rows


def _rare_states(experience: Any, problem: Any):
    """``states [B, d] -> [B]`` bool, states far from any the trial experienced; None without
    a continuous log."""
    if experience is None or experience.finite or not experience.num_transitions:
        return None
    import torch

    from qworld.worldmodel.experience import rare_state_mask

    dyn = problem.dynamics
    last: dict = {}

    def rare(states):
        # every method is scored on the same seeded states: one nearest-neighbour pass per checkpoint
        if "states" not in last or not torch.equal(last["states"], states):
            last["states"], last["mask"] = states.clone(), rare_state_mask(states, experience.states, dyn.low, dyn.high)
        return last["mask"]

    return rare


def _agent_forward_model(qfun: Any):
    """``(states [n, d], actions [n]) -> [n, d]`` of an agent that learns a forward model
    (D3G: ``module.forward_model_states``), no grad, on the module's device, input dtype out."""
    import torch

    module = qfun.module
    if not hasattr(module, "forward_model_states"):
        family = qfun.config.get(K.ALGORITHM) or "pqn"
        raise ValueError(f"method 'forward_model' needs an agent with a forward model (d3g); this is {family}")
    param = next(module.parameters())

    @torch.no_grad()
    def step(states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        out = module.forward_model_states(states.to(param.device, param.dtype), actions.to(param.device))
        return out.to(device=states.device, dtype=states.dtype)

    return step


def _error_text(exc: BaseException) -> str:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last[:2000]
