"""An RLlib episode replay buffer that keeps transitions in preallocated arrays and samples
windows of consecutive transitions with array indexing (MR.Q's unroll, D3G's transitions).

:class:`WindowEpisodeReplayBuffer` subclasses RLlib's ``EpisodeReplayBuffer`` (its
``add(episodes)``, ``sample``, ``get_num_timesteps``, ``get_state`` / ``set_state``) and is
plugged in through the algorithm config's ``replay_buffer_config={"type": ..., ...}``. RLlib's
buffer keeps whole episodes and cuts one ``episode.slice`` per sampled window (about a
millisecond of Python per window); this one stores one *row* per observation in a ring:

- ``obs [C, D]`` the observation (the first ``obs_dim`` columns of the episode's
  observations, or ``info["state"]`` with ``observation="info_state"``);
- for a row whose transition is known: ``actions [C]``, ``rewards / terminals [C, L]`` (every
  goal's, from the info the env returned with the next observation, CONTRACTS.md) and
  ``next [C]``, the row of the next observation of the same episode; ``next = -1`` marks the
  episode's last observation so far (it ended, terminated or truncated, or its next chunk
  has not arrived: when it does, that row becomes the chunk's first transition).

A window of T transitions starts at a row drawn uniformly among the transition rows and
follows ``next``: transition j is valid while the chain has not met a ``-1``, so a window
never crosses into another episode and ends where its episode ends (terminated or
truncated alike: the final observation is kept, a truncated episode's value bootstraps from
it) or where the data ends, exactly as RLlib's slices did. After the end the window is padded
(``valid`` False, zero action / rewards / terminals, the last observation repeated).

Capacity counts rows: a full buffer holds ``capacity`` observations, i.e. ``capacity`` minus
one row per episode (its last observation) transitions. The ring overwrites the oldest row;
a row's successor is always newer than it, so a live row's chain never reaches an
overwritten row. The sampling generator is seeded (``seed``) and part of the state.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import numpy as np

from ray.rllib.utils import force_list
from ray.rllib.utils.replay_buffers.episode_replay_buffer import EpisodeReplayBuffer

OBS = "obs"  # [B, T+1, D]
ACTIONS = "actions"  # [B, T] int64
REWARDS = "rewards"  # [B, T, L] float32
TERMINALS = "terminals"  # [B, T, L] float32
VALID = "valid"  # [B, T] bool (a prefix of True)

OBSERVATIONS = ("obs", "info_state")  # where a row's observation comes from

_ARRAYS = ("obs", "actions", "rewards", "terminals", "next", "stamp")


class WindowEpisodeReplayBuffer(EpisodeReplayBuffer):
    """Ring-buffer episode replay with vectorised window sampling (see module doc).

    Args:
        capacity: rows (observations) held; the oldest are overwritten.
        observation: ``"obs"`` (the episode's observations, first ``obs_dim`` columns) or
            ``"info_state"`` (``info["state"]`` of each observation).
        obs_dim: columns of the observation kept (``None``: all).
        seed: seed of the sampling generator.
    """

    def __init__(self, capacity: int = 10000, *, observation: str = "obs", obs_dim: Optional[int] = None,
                 seed: Optional[int] = None, **kwargs):
        super().__init__(capacity=int(capacity), **kwargs)
        if observation not in OBSERVATIONS:
            raise ValueError(f"observation={observation!r}: must be one of {OBSERVATIONS}")
        self.capacity = int(capacity)
        self.observation = observation
        self.obs_dim = None if obs_dim is None else int(obs_dim)
        self.rng = np.random.default_rng(seed)
        self._a: Optional[Dict[str, np.ndarray]] = None  # the arrays, allocated at the first add
        self._ptr = 0  # next row to write
        self._rows = 0  # rows holding data (<= capacity)
        self._written = 0  # rows written in the buffer's life (a row's stamp: its write number)
        self._transitions = 0  # rows with a known transition (next >= 0)
        self._open: Dict[str, tuple] = {}  # episode id -> (its last row, that row's stamp)
        self.added_timesteps = 0  # transitions added in the buffer's life (get_added_timesteps)

    # ------------------------------------------------------------------ adding
    def _observations(self, ep) -> np.ndarray:
        if self.observation == "info_state":
            return np.asarray([info["state"] for info in ep.get_infos()], dtype=np.float32).reshape(len(ep) + 1, -1)
        obs = np.asarray(ep.get_observations(), dtype=np.float32).reshape(len(ep) + 1, -1)
        return obs if self.obs_dim is None else obs[:, : self.obs_dim]

    def _allocate(self, obs_dim: int, num_goals: int) -> None:
        C = self.capacity
        self._a = {
            "obs": np.zeros((C, obs_dim), np.float32),
            "actions": np.zeros(C, np.int32),
            "rewards": np.zeros((C, num_goals), np.float32),
            "terminals": np.zeros((C, num_goals), bool),
            "next": np.full(C, -1, np.int32),
            "stamp": np.full(C, -1, np.int64),
        }

    def _take_rows(self, k: int) -> np.ndarray:
        """The next ``k`` ring rows, cleared (the oldest data is overwritten)."""
        rows = (self._ptr + np.arange(k)) % self.capacity
        nxt = self._a["next"]
        self._transitions -= int((nxt[rows] >= 0).sum())
        nxt[rows] = -1
        self._a["stamp"][rows] = self._written + np.arange(k)
        self._ptr = int((self._ptr + k) % self.capacity)
        self._rows = min(self.capacity, self._rows + k)
        self._written += k
        return rows

    def add(self, episodes: Union[List[Any], Any]) -> None:
        """Write the chunks' observations and transitions; a chunk continuing an episode
        starts at that episode's last row."""
        for ep in force_list(episodes):
            n = len(ep)
            obs = self._observations(ep)
            if n == 0 and (ep.is_done or self._a is None):
                continue  # no transition, and nothing to keep for one (or to size the arrays by)
            infos = list(ep.get_infos())[1:]
            L = np.asarray(infos[0]["rewards"]).size if self._a is None else self._a["rewards"].shape[1]
            rewards = np.asarray([f["rewards"] for f in infos], np.float32).reshape(n, L)
            terminals = np.asarray([f["terminals"] for f in infos], bool).reshape(n, L)
            if self._a is None:
                self._allocate(obs.shape[1], L)
            if n + 1 > self.capacity:
                raise ValueError(f"an episode chunk of {n} steps does not fit a buffer of capacity {self.capacity}")
            first = self._open.pop(ep.id_, None)
            if first is not None:
                row, stamp = first
                overwritten_now = (row - self._ptr) % self.capacity < n  # by the rows this chunk takes
                if self._a["stamp"][row] != stamp or overwritten_now:
                    first = None  # its last row is gone: the chunk starts afresh
            if first is None:
                rows = self._take_rows(n + 1)
                self._a["obs"][rows] = obs
            else:
                new = self._take_rows(n)
                self._a["obs"][new] = obs[1:]
                rows = np.concatenate([[first[0]], new])
            t = rows[:-1]
            self._a["actions"][t] = np.asarray(ep.get_actions()).reshape(n)
            self._a["rewards"][t] = rewards
            self._a["terminals"][t] = terminals
            self._a["next"][t] = rows[1:]
            self._transitions += n
            self.added_timesteps += n
            if not ep.is_done:
                self._open[ep.id_] = (int(rows[-1]), int(self._a["stamp"][rows[-1]]))

    # ------------------------------------------------------------------ sampling
    def _draw(self, num: int) -> np.ndarray:
        """``num`` rows drawn uniformly among the transition rows."""
        if self._transitions == 0:
            raise ValueError("the replay buffer holds no transition yet")
        rows = self.rng.integers(0, self._rows, size=num)
        bad = self._a["next"][rows] < 0
        while bad.any():  # a last observation (one row per episode): draw again
            rows[bad] = self.rng.integers(0, self._rows, size=int(bad.sum()))
            bad = self._a["next"][rows] < 0
        return rows

    def sample(self, num_items: Optional[int] = None, *, batch_size_B: Optional[int] = None,
               batch_length_T: Optional[int] = None, **kwargs) -> Dict[str, np.ndarray]:
        """``B = batch_size_B or num_items`` windows of ``T = batch_length_T or 1`` transitions:
        ``{obs [B, T+1, D], actions [B, T] int64, rewards / terminals [B, T, L] float32,
        valid [B, T]}`` (see module doc; other keywords of RLlib's ``sample`` are ignored)."""
        out = self.windows(self._draw(int(batch_size_B or num_items or 1)), int(batch_length_T or 1))
        self.sampled_timesteps += int(out[VALID].sum())
        return out

    def windows(self, rows: np.ndarray, T: int) -> Dict[str, np.ndarray]:
        """The windows of ``T`` transitions starting at ``rows`` (transition rows), as :meth:`sample`."""
        a = self._a
        idx = np.asarray(rows, np.int64)
        B = idx.shape[0]
        L, D = a["rewards"].shape[1], a["obs"].shape[1]
        obs = np.empty((B, T + 1, D), np.float32)
        actions = np.zeros((B, T), np.int64)
        rewards = np.zeros((B, T, L), np.float32)
        terminals = np.zeros((B, T, L), np.float32)
        valid = np.zeros((B, T), bool)
        obs[:, 0] = a["obs"][idx]
        live = np.ones(B, bool)
        for j in range(T):
            nxt = a["next"][idx]
            live &= nxt >= 0
            valid[:, j] = live
            actions[live, j] = a["actions"][idx[live]]
            rewards[live, j] = a["rewards"][idx[live]]
            terminals[live, j] = a["terminals"][idx[live]]
            idx = np.where(live, nxt, idx)
            obs[:, j + 1] = a["obs"][idx]
        return {OBS: obs, ACTIONS: actions, REWARDS: rewards, TERMINALS: terminals, VALID: valid}

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return self.get_num_timesteps()

    def get_num_timesteps(self, module_id=None) -> int:
        """Transitions held (rows with a known next observation)."""
        return int(self._transitions)

    def get_added_timesteps(self, module_id=None) -> int:
        """Transitions added in the buffer's life (also those overwritten since)."""
        return int(self.added_timesteps)

    def get_num_episodes(self, module_id=None) -> int:
        """Episodes (or their remaining parts) held: one last-observation row each."""
        return int(self._rows - self._transitions)

    def get_num_rows(self) -> int:
        return int(self._rows)

    def nbytes_when_full(self, obs_dim: int, num_goals: int) -> int:
        """Bytes of the arrays (what a checkpoint of a full buffer holds) for these sizes."""
        C = self.capacity
        return C * (4 * obs_dim + 4 + 4 * num_goals + num_goals + 4 + 8)

    # ------------------------------------------------------------------ state
    def get_state(self) -> Dict[str, Any]:
        """Everything needed to go on exactly: the filled rows of every array, the ring
        position, the open episodes and the sampling generator's state."""
        arrays = None if self._a is None else {k: self._a[k][: self._rows].copy() for k in _ARRAYS}
        return {
            "capacity": self.capacity, "observation": self.observation, "obs_dim": self.obs_dim,
            "arrays": arrays, "ptr": self._ptr, "rows": self._rows, "written": self._written,
            "transitions": self._transitions, "open": dict(self._open),
            "rng": self.rng.bit_generator.state, "added": self.added_timesteps,
            "sampled_timesteps": self.sampled_timesteps,
        }

    def set_state(self, state: Dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"a replay buffer of capacity {state['capacity']} cannot be restored into one of "
                             f"capacity {self.capacity}")
        arrays = state["arrays"]
        self._a = None
        if arrays is not None:
            self._allocate(arrays["obs"].shape[1], arrays["rewards"].shape[1])
            rows = int(state["rows"])
            for k in _ARRAYS:
                self._a[k][:rows] = arrays[k]
        self._ptr, self._rows, self._written = int(state["ptr"]), int(state["rows"]), int(state["written"])
        self._transitions = int(state["transitions"])
        self._open = {k: tuple(v) for k, v in state["open"].items()}
        self.rng.bit_generator.state = state["rng"]
        self.added_timesteps = int(state["added"])
        self.sampled_timesteps = int(state["sampled_timesteps"])
