"""What an agent experienced, and the world models learned directly from it.

The ``supervised`` extraction method answers the first question of any P-learning result:
how does a model extracted from Q compare with one learned from the agent's own transitions,
the same data? A trial records its transitions in an :class:`ExperienceLog`, saved with
every checkpoint (``layout.EXPERIENCE_FILE``):

- finite envs: ``counts [S, A, S]`` of every experienced ``(s, a, s')``, exact and complete;
- continuous envs: a uniform reservoir sample (Vitter's algorithm R) of ``capacity``
  experienced ``(s, a, s')`` triples out of all ``num_transitions``, so the file's size is
  bounded whatever the run's length.

Models from it (given the agent's transitions, not Q and nothing of the true P):

- :func:`supervised_p`: maximum-likelihood ``P_hat[s, a] = counts[s, a] / n(s, a)``; rows
  never experienced are uniform and reported (``unvisited`` mask, the ``unvisited_fraction``
  column), not hidden;
- :func:`fit_supervised`: the P-learning successor network (``plearn.continuous.SuccessorNet``,
  same size and optimiser settings) regressed on the experienced ``(s, a) -> s'``.

Shapes: S states, A actions, d state dims, C reservoir capacity. No Ray.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qworld.layout import EXPERIENCE_FILE

# World models not extracted from Q, and what each is given (cf. ``plearn.finite.GIVEN``). None is
# handed any of the true dynamics: not oracles, but not findings about Q either; they are the
# yardsticks a model extracted from Q is compared with, on the same data.
GIVEN = {
    "supervised": "the transitions the agent experienced up to the checkpoint (not Q)",
    "qss": "the same transitions (not Q): the forward model of QSS's learned neighbour set and inverse dynamics",
    "forward_model": "the agent's own learned forward model f(s, a) (D3G; not its Q)",
}
FINITE_METHODS = ("supervised", "qss")
CONTINUOUS_METHODS = ("supervised", "forward_model")
EXPLICIT_METHODS = tuple(GIVEN)

# Fewer experienced transitions than this from (s, a) make the pair "rare": the scores under
# the ``rare/`` prefix compare models where the agent has (almost) no data of its own.
RARE_VISITS = 5
DEFAULT_CAPACITY = 1 << 16


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass
class ExperienceLog:
    """The transitions an agent experienced so far (see module doc).

    Attributes:
        num_actions: A.
        num_states: S for a finite env (``counts`` kept), None for a continuous one.
        state_dim: d for a continuous env (reservoir kept).
        capacity: C, reservoir size (continuous).
        num_transitions: every transition added, kept or not.
        counts: ``[S, A, S]`` int64 (finite).
        states, actions, next_states: ``[n, d]`` float32, ``[n]`` int64, ``[n, d]`` float32
            with ``n = min(C, num_transitions)`` (continuous), a uniform sample of all.
        seed: of the reservoir's draws.
    """

    num_actions: int
    num_states: int | None = None
    state_dim: int | None = None
    capacity: int = DEFAULT_CAPACITY
    num_transitions: int = 0
    counts: np.ndarray | None = None
    states: np.ndarray | None = None
    actions: np.ndarray | None = None
    next_states: np.ndarray | None = None
    seed: int = 0
    _rng: np.random.Generator = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if (self.num_states is None) == (self.state_dim is None):
            raise ValueError("ExperienceLog needs exactly one of num_states (finite) or state_dim (continuous)")
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        S, A = self.num_states, int(self.num_actions)
        if self.finite and self.counts is None:
            self.counts = np.zeros((S, A, S), dtype=np.int64)
        if not self.finite and self.states is None:
            self.states = np.zeros((0, self.state_dim), np.float32)
            self.actions = np.zeros((0,), np.int64)
            self.next_states = np.zeros((0, self.state_dim), np.float32)
        if self._rng is None:
            self._rng = np.random.default_rng([int(self.seed), int(self.num_transitions)])

    @property
    def finite(self) -> bool:
        return self.num_states is not None

    def add(self, states: Any, actions: Any, next_states: Any) -> None:
        """Add a batch of transitions (numpy or torch; any leading shape, flattened).

        Finite: ``states``, ``next_states`` are state indices. Continuous: ``[..., d]`` states.
        """
        a = _numpy(actions).reshape(-1).astype(np.int64)
        m = a.shape[0]
        if self.finite:
            s = _numpy(states).reshape(-1).astype(np.int64)
            s2 = _numpy(next_states).reshape(-1).astype(np.int64)
            S, A = self.num_states, self.num_actions
            flat = (s * A + a) * S + s2
            self.counts += np.bincount(flat, minlength=S * A * S).reshape(S, A, S)
            self.num_transitions += m
            return
        d = self.state_dim
        s = _numpy(states).reshape(-1, d).astype(np.float32)
        s2 = _numpy(next_states).reshape(-1, d).astype(np.float32)
        n, C = self.num_transitions, self.capacity
        fill = min(max(C - n, 0), m)
        if fill:
            self.states = np.concatenate([self.states, s[:fill]])
            self.actions = np.concatenate([self.actions, a[:fill]])
            self.next_states = np.concatenate([self.next_states, s2[:fill]])
        if fill < m:
            # Algorithm R, one batch at a time: item i (0-based, global) replaces a uniform slot
            # of [0, i] when that slot is in the reservoir; a later duplicate slot wins, as in order.
            idx = np.arange(n + fill, n + m)
            slot = (self._rng.random(idx.shape[0]) * (idx + 1)).astype(np.int64)
            keep = slot < C
            src = np.nonzero(keep)[0] + fill
            self.states[slot[keep]] = s[src]
            self.actions[slot[keep]] = a[src]
            self.next_states[slot[keep]] = s2[src]
        self.num_transitions += m

    def visits(self) -> np.ndarray:
        """``[S, A]`` experienced transitions from each (s, a) (finite)."""
        return self.counts.sum(-1)

    # ---- storage ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain arrays and numbers (for ``np.savez`` and RLlib's algorithm state)."""
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_") and v is not None}
        if self.finite:  # sparse: most (s, a, s') never happen
            nz = np.flatnonzero(self.counts)
            out["counts"] = np.stack([nz, self.counts.reshape(-1)[nz]])
        return out

    @classmethod
    def from_state_dict(cls, state: dict) -> "ExperienceLog":
        state = {k: (v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v) for k, v in dict(state).items()}
        if state.get("num_states") is not None and "counts" in state:
            S, A = int(state["num_states"]), int(state["num_actions"])
            idx, val = np.asarray(state.pop("counts"))
            counts = np.zeros(S * A * S, np.int64)
            counts[idx] = val
            state["counts"] = counts.reshape(S, A, S)
        return cls(**state)

    def save(self, directory: str | Path) -> Path:
        """Write ``EXPERIENCE_FILE`` into a checkpoint directory; returns its path."""
        path = Path(directory) / EXPERIENCE_FILE
        np.savez_compressed(path, **{k: np.asarray(v) for k, v in self.state_dict().items()})
        return path


def load_experience(checkpoint: str | Path) -> ExperienceLog | None:
    """The log saved in a checkpoint directory, or None if the trial recorded none."""
    path = Path(getattr(checkpoint, "path", checkpoint)) / EXPERIENCE_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return ExperienceLog.from_state_dict({k: data[k] for k in data.files})


# ------------------------------------------------------------------------------------------
# models learned from experience
# ------------------------------------------------------------------------------------------
def supervised_p(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood dynamics from transition counts.

    Args:
        counts: ``[S, A, S]`` non-negative counts of experienced ``(s, a, s')``.

    Returns:
        ``(P_hat [S, A, S], unvisited [S, A] bool)``: rows with no experience are uniform
        over S (the likelihood says nothing there) and marked in ``unvisited``.
    """
    counts = np.asarray(counts)
    if counts.ndim != 3 or counts.shape[0] != counts.shape[2]:
        raise ValueError(f"counts must have shape [S, A, S], got {counts.shape}")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    n = counts.sum(-1, keepdims=True).astype(np.float64)
    unvisited = n[..., 0] == 0
    P_hat = np.where(n > 0, counts / np.maximum(n, 1.0), 1.0 / counts.shape[-1])
    return P_hat, unvisited


def finite_model(method: str, log: ExperienceLog | None) -> tuple[np.ndarray, np.ndarray]:
    """``(P_hat [S, A, S], unvisited [S, A])`` of an explicit finite method from a trial's log."""
    if method not in FINITE_METHODS:
        raise ValueError(f"{method!r} is not an explicit finite method; known: {FINITE_METHODS}")
    if log is None or not log.finite:
        raise ValueError(f"method {method!r} needs the trial's experience ({EXPERIENCE_FILE} in the checkpoint); "
                         "this checkpoint has none (PQN's fast runner records it: experience_capacity > 0)")
    if method == "supervised":
        return supervised_p(log.counts)
    from qworld.worldmodel.qss import qss_world_model

    model = qss_world_model(log.counts)
    return model.P_hat, model.unseen


def fit_supervised(problem: Any, states: Any, actions: Any, next_states: Any, config: Any = None,
                   device: str = "cpu") -> Any:
    """The P-learning successor network regressed on experienced transitions.

    Same model (``SuccessorNet``: encoding, size, identity start) and optimiser settings
    (``PLearnConfig``: steps, batch, lr with cosine decay) as P-learning from Q, so the two
    differ only in what they are fitted to: here ``|Delta_hat - Delta| / std(Delta)`` per dim
    (L1) or its square (L2) on the data, ``Delta`` wrapped on periodic dims.

    Args:
        problem: a ``ContinuousProblem`` (only its state box, periodic dims and A are read).
        states, actions, next_states: ``[n, d]``, ``[n]``, ``[n, d]`` experienced transitions.
        config: ``plearn.continuous.PLearnConfig`` (its ``loss``, ``steps``, ``batch_size``,
            ``lr``, ``hidden``, ``layers``, ``init_scale``, ``delta_scale``, ``seed`` are used).

    Returns:
        ``plearn.continuous.PLearnResult``.
    """
    import torch

    from qworld.worldmodel.plearn.continuous import PLearnConfig, SuccessorNet, fit_model
    from qworld_envs.continuous import wrap_angle

    cfg = config or PLearnConfig()
    dyn = problem.dynamics
    s = torch.as_tensor(_numpy(states), dtype=torch.float32, device=device)
    a = torch.as_tensor(_numpy(actions), dtype=torch.long, device=device)
    s2 = torch.as_tensor(_numpy(next_states), dtype=torch.float32, device=device)
    if s.ndim != 2 or s.shape != s2.shape or a.shape != s.shape[:1] or len(a) == 0:
        raise ValueError(f"need states [n, d], actions [n], next_states [n, d] with n > 0; got "
                         f"{tuple(s.shape)}, {tuple(a.shape)}, {tuple(s2.shape)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = SuccessorNet(dyn.low, dyn.high, dyn.periodic, dyn.num_actions, hidden=cfg.hidden,
                             layers=cfg.layers, delta_scale=cfg.delta_scale, init_scale=cfg.init_scale).to(device)
    delta = s2 - s
    delta = torch.where(model.periodic, wrap_angle(delta), delta)
    # Residuals per dim in units of the data's own spread of Delta: MountainCar's Delta v is
    # ~30x smaller than its Delta p and would otherwise be left unfitted.
    spread = delta.std(0).clamp_min(1e-8)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def loss_at(step: int) -> torch.Tensor:
        i = torch.randint(len(a), (min(cfg.batch_size, len(a)),), generator=gen, device=device)
        resid = (model.delta(s[i], a[i]) - delta[i]) / spread
        return resid.abs().mean() if cfg.loss == "l1" else resid.square().mean()

    return fit_model(model, cfg, loss_at)


def rare_state_mask(states: Any, experienced: Any, low: Any, high: Any, radius: float = 0.05,
                    chunk: int = 2048) -> np.ndarray:
    """``[B]`` bool: states with no experienced state within ``radius`` (max-norm, in units of
    the box's side per dim). The continuous counterpart of a rare (s, a) pair.

    Args:
        states: ``[B, d]`` states to classify; experienced: ``[n, d]``; low, high: ``[d]`` box.
    """
    import torch

    lo = torch.as_tensor(_numpy(low), dtype=torch.float32)
    span = torch.as_tensor(_numpy(high), dtype=torch.float32) - lo
    x = (torch.as_tensor(_numpy(states), dtype=torch.float32) - lo) / span
    e = (torch.as_tensor(_numpy(experienced), dtype=torch.float32) - lo) / span
    if len(e) == 0:
        return np.ones(len(x), dtype=bool)
    near = torch.zeros(len(x), dtype=torch.bool)
    for i in range(0, len(e), chunk):
        near |= (torch.cdist(x, e[i : i + chunk], p=float("inf")) <= radius).any(1)
    return (~near).numpy()
