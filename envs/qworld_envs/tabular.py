"""Any tabular MDP as a :class:`FiniteMDP`: a gymnasium env's own ``P`` table, or a ``.npz`` file.

## Sources
- :func:`mdp_from_gymnasium` reads ``env.unwrapped.P`` of any gymnasium env that has one
  (gymnasium's toy-text envs: ``FrozenLake-v1`` with ``map_name`` / ``desc`` /
  ``is_slippery``, ``CliffWalking-v1``, ``CliffWalkingSlippery-v1``, ``Taxi-v3`` with
  ``is_rainy`` / ``fickle_passenger``; any third-party env with the same table
  ``P[s][a] = [(prob, next_state, reward, terminated), ...]``).
- :func:`mdp_from_npz` reads a file with ``P [S, A, S]`` and, optionally, ``coords [S, 2]``
  (int grid (row, col) of each state) and ``terminal [S]`` (bool); :func:`save_npz` writes one.

## Rewards
The env's own rewards are not kept: qworld's goal families (``qworld_envs.goals``) attach
the rewards, so one P serves every goal set.

## Terminal states
A state is terminal when the env ends the episode on arriving there (FrozenLake's holes and
its goal ``G``, CliffWalking's goal, Taxi's "passenger delivered" states; for a file, its
``terminal`` mask). Then:

- its row of P is made absorbing (``P[s, a] = one_hot(s)`` for every a), whatever the env
  or the file says happens after the end;
- ``mdp.meta["terminal"]`` (``[S]`` bool, also ``FiniteMDP.terminal``) records them;
- every goal ends its episode there too (``goals.make_goals``), paying that goal's arrival
  reward (1 on a hole only for the goal placed on that hole); they are never start states;
- no Q constrains their rows (no episode acts in them), so world-model scores leave those
  rows out and count them (``p_rows_unscored``), and planning treats them as terminal.

``P`` is the env's table as it stands: dynamics that its ``step`` adds outside the table
(Taxi's ``fickle_passenger``) are not part of the MDP.

A gymnasium env whose termination is not a function of the arrival state (one transition
into s' ends the episode, another from a live state does not) is refused with a ValueError.

## States no episode can reach
For a gymnasium env, only the states reachable from its initial-state distribution
(``initial_state_distrib`` when the env has one, else every state) through live states are
kept: CliffWalking's ten cliff cells (the player is sent back to the start, never stands on
them) are not states of the MDP. Kept states keep their order; ``meta["env_states"][s]`` is
the env's own index of qworld state ``s`` (the identity when nothing is dropped). A file is
taken as given.

## Coordinates
Grid (row, col) when the env has a grid: ``nrow`` / ``ncol`` (FrozenLake) or a 2-tuple
``shape`` (CliffWalking), with the env's state ``row * ncol + col``; none otherwise (Taxi).
Methods that need coordinates (``moves``) refuse an MDP without them.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import numpy as np

from qworld_envs.finite import FiniteMDP

NPZ_KEYS = ("P", "coords", "terminal")  # P required, the others optional


def mdp_from_gymnasium(env_id: str, **kwargs: Any) -> FiniteMDP:
    """The finite MDP of gymnasium env ``env_id`` built with ``kwargs``, from its own ``P`` table.

    Args:
        env_id: a gymnasium id (``"FrozenLake-v1"``, ``"Taxi-v3"``, ...).
        **kwargs: passed to ``gymnasium.make`` (``map_name="8x8"``, ``is_slippery=False``, ...).

    Returns:
        The MDP over the reachable states, terminal rows absorbing, ``meta`` with
        ``terminal`` (``[S]`` bool), ``env_states`` (``[S]`` int: the env's index of each
        state), ``gym_id``, ``gym_kwargs`` and, for FrozenLake-like maps, ``layout``.

    Raises:
        ValueError: an unknown id, an env without a tabular ``P``, a malformed table, or a
            termination that is not a function of the arrival state.
        TypeError: kwargs the env does not take (gymnasium's message).
    """
    import gymnasium

    if env_id not in gymnasium.registry:
        raise ValueError(f"{env_id!r} is not a registered gymnasium id")
    try:
        env = gymnasium.make(env_id, **kwargs)
    except (KeyError, ValueError, AssertionError) as exc:  # a bad kwarg value: name the kwarg
        bad = [k for k, v in kwargs.items() if isinstance(exc, KeyError) and exc.args and v == exc.args[0]]
        allowed = ""
        if bad == ["map_name"]:
            from gymnasium.envs.toy_text.frozen_lake import MAPS

            allowed = f"; allowed: {sorted(MAPS)} (or a map of your own as desc)"
        what = f"{bad[0]}: {kwargs[bad[0]]!r} is not accepted by {env_id}" if bad else \
            f"{env_id} cannot be built with {kwargs}: {type(exc).__name__}: {exc}"
        raise ValueError(what + allowed) from None
    try:
        raw = env.unwrapped
        table = getattr(raw, "P", None)
        if not isinstance(table, dict) or not table:
            raise ValueError(f"gymnasium env {env_id!r} has no tabular P (env.unwrapped.P: a dict "
                             "P[s][a] = [(prob, next_state, reward, terminated), ...])")
        S = len(table)
        if sorted(table) != list(range(S)):
            raise ValueError(f"{env_id}: P's states must be 0..{S - 1}")
        A = len(table[0])
        P = np.zeros((S, A, S))
        ends = np.zeros(S, dtype=bool)  # some transition into s' terminates
        for s in range(S):
            if sorted(table[s]) != list(range(A)):
                raise ValueError(f"{env_id}: P[{s}] must have the actions 0..{A - 1}")
            for a in range(A):
                for prob, s2, _reward, done in table[s][a]:
                    P[s, a, int(s2)] += float(prob)
                    if float(prob) > 0 and done:
                        ends[int(s2)] = True
        isd = getattr(raw, "initial_state_distrib", None)
        starts = np.flatnonzero(np.asarray(isd) > 0) if isd is not None else np.arange(S)
        coords = _grid_coords(raw, S)
        layout = _layout(raw) if coords is not None else None
    finally:
        env.close()
    terminal = ends
    # Which states the env can be in: from its starts, through states where episodes go on.
    kept = np.zeros(S, dtype=bool)
    kept[starts] = True
    queue = deque(int(s) for s in starts)
    while queue:
        s = queue.popleft()
        if terminal[s]:
            continue
        for s2 in np.flatnonzero(P[s].sum(axis=0) > 0):
            if not kept[s2]:
                kept[s2] = True
                queue.append(int(s2))
    # Termination must be a property of the arrival state among the states episodes act in.
    live = np.flatnonzero(kept & ~terminal)
    mixed = [s2 for s2 in np.flatnonzero(terminal & kept) if _live_arrival(table, live, s2)]
    if mixed:
        raise ValueError(f"{env_id}: arriving in state {mixed[0]} ends the episode on some transitions and not "
                         "on others; qworld needs termination to be a property of the arrival state")
    env_states = np.flatnonzero(kept)
    index = -np.ones(S, dtype=np.int64)
    index[env_states] = np.arange(len(env_states))
    P = P[env_states][:, :, env_states]
    terminal = terminal[env_states]
    P[terminal] = np.eye(len(env_states))[terminal][:, None, :]  # absorbing, for every action
    meta = {"terminal": terminal, "env_states": env_states, "gym_id": env_id, "gym_kwargs": dict(kwargs)}
    if layout is not None:
        meta["layout"] = layout
    name = env_id + "".join(f",{k}={v}" for k, v in sorted(kwargs.items()) if k != "desc")
    return FiniteMDP(P, coords=None if coords is None else coords[env_states], name=name, meta=meta)


def _live_arrival(table: dict, live_states: np.ndarray, s2: int) -> bool:
    """Whether some transition from a live state into ``s2`` does not end the episode."""
    for s in live_states:
        for outcomes in table[int(s)].values():
            if any(float(p) > 0 and int(t) == s2 and not done for p, t, _r, done in outcomes):
                return True
    return False


def _grid_coords(raw: Any, S: int) -> np.ndarray | None:
    """``[S, 2]`` (row, col) of the env's states on its grid, or None (no grid)."""
    ncol = getattr(raw, "ncol", None)
    nrow = getattr(raw, "nrow", None)
    shape = getattr(raw, "shape", None)
    if ncol is None and isinstance(shape, tuple) and len(shape) == 2:
        nrow, ncol = shape
    if not isinstance(ncol, (int, np.integer)) or not isinstance(nrow, (int, np.integer)) or nrow * ncol != S:
        return None
    s = np.arange(S)
    return np.stack([s // ncol, s % ncol], axis=1)


def _layout(raw: Any) -> str | None:
    """The env's map as text (FrozenLake's ``desc``), for ``render``; None without one."""
    desc = getattr(raw, "desc", None)
    if desc is None or np.asarray(desc).ndim != 2:
        return None
    rows = np.asarray(desc)
    return "\n".join("".join(c.decode() if isinstance(c, bytes) else str(c) for c in row) for row in rows)


def mdp_from_npz(path: str | os.PathLike) -> FiniteMDP:
    """A finite MDP from a ``.npz`` file: ``P [S, A, S]``, optional ``coords [S, 2]`` (int
    grid cells) and ``terminal [S]`` (bool; those rows are made absorbing).

    Raises:
        ValueError: a missing file or ``P``, an unknown key (the allowed ones are named), or
            an array of the wrong shape or kind (named).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: {path!r} is not a file (an .npz with P[S, A, S], optional coords[S, 2], terminal[S])")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - not an npz: say which file
        raise ValueError(f"path: {path!r} is not a readable .npz file: {exc}") from None
    with data:
        unknown = sorted(set(data.files) - set(NPZ_KEYS))
        if unknown:
            raise ValueError(f"{path}: unknown arrays {unknown}; allowed: {list(NPZ_KEYS)} (P required)")
        if "P" not in data.files:
            raise ValueError(f"{path}: no array 'P' (the transition tensor P[S, A, S])")
        try:
            P = np.array(data["P"], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: P must be numeric: {exc}") from None
        coords = np.array(data["coords"]) if "coords" in data.files else None
        terminal = np.array(data["terminal"]) if "terminal" in data.files else None
    if P.ndim != 3 or P.shape[0] != P.shape[2]:
        raise ValueError(f"{path}: P must have shape [S, A, S], got {P.shape}")
    S = P.shape[0]
    if coords is not None and (coords.shape != (S, 2) or not np.issubdtype(coords.dtype, np.integer)):
        raise ValueError(f"{path}: coords must be an integer array of shape [S, 2] = [{S}, 2], "
                         f"got {coords.dtype} {coords.shape}")
    if terminal is None:
        terminal = np.zeros(S, dtype=bool)
    elif terminal.shape != (S,) or terminal.dtype != bool:
        raise ValueError(f"{path}: terminal must be a bool array of shape [S] = [{S}], got {terminal.dtype} "
                         f"{terminal.shape}")
    P[terminal] = np.eye(S)[terminal][:, None, :]
    name = os.path.splitext(os.path.basename(path))[0]
    return FiniteMDP(P, coords=coords, name=name, meta={"terminal": terminal, "path": path})


def save_npz(mdp: FiniteMDP, path: str | os.PathLike) -> None:
    """Write ``mdp`` as a file :func:`mdp_from_npz` reads back (P, coords, terminal)."""
    arrays = {"P": np.asarray(mdp.P), "terminal": mdp.terminal}
    if mdp.coords is not None:
        arrays["coords"] = np.asarray(mdp.coords)
    np.savez_compressed(path, **arrays)


# gymnasium ids with a tabular P that qworld registers as ``qworld/<id>`` when the installed
# gymnasium has them (any other such env: :func:`mdp_from_gymnasium` + :func:`save_npz`, then
# ``TABULAR_FILE_ID`` with ``path``).
TABULAR_GYM_IDS = ("FrozenLake-v1", "FrozenLake8x8-v1", "CliffWalking-v1", "CliffWalkingSlippery-v1", "Taxi-v3")
TABULAR_FILE_ID = "qworld/TabularMDP-v0"  # kwarg path: an .npz read by mdp_from_npz


def qworld_id(gym_id: str) -> str:
    """The qworld id of a tabular gymnasium env: ``FrozenLake-v1`` -> ``qworld/FrozenLake-v1``."""
    return f"qworld/{gym_id}"


def gym_env_spec(gym_id: str):
    """The ``FiniteEnvSpec`` of a tabular gymnasium env: its constructor's keywords (but
    ``render_mode``) with the defaults its registration gives, and its time limit."""
    import functools
    import inspect

    import gymnasium

    from qworld_envs.problems import FiniteEnvSpec

    reg = gymnasium.registry[gym_id]
    cls = reg.entry_point
    if isinstance(cls, str):
        module, _, attr = cls.partition(":")
        cls = getattr(__import__(module, fromlist=[attr]), attr)
    params = inspect.signature(cls.__init__).parameters
    defaults = {k: p.default for k, p in params.items()
                if k not in ("self", "render_mode") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.default is not inspect.Parameter.empty}
    defaults.update(reg.kwargs or {})
    return FiniteEnvSpec(build_mdp=functools.partial(mdp_from_gymnasium, gym_id), mdp_defaults=defaults,
                         max_episode_steps=reg.max_episode_steps)


def _file_mdp(path: str | None) -> FiniteMDP:
    if path is None:
        raise ValueError(f"{TABULAR_FILE_ID} needs the env kwarg path: an .npz with P[S, A, S] "
                         "(optional coords[S, 2], terminal[S])")
    return mdp_from_npz(path)


def file_env_spec():
    """The ``FiniteEnvSpec`` of ``TABULAR_FILE_ID`` (kwarg ``path``)."""
    from qworld_envs.problems import FiniteEnvSpec

    return FiniteEnvSpec(build_mdp=_file_mdp, mdp_defaults={"path": None})
