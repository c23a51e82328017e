"""Ground-truth goal-conditioned Q for continuous envs: value iteration on a grid.

Shapes: L goals, A actions, d state dims, n grid points (``n = prod(grid.shape)``),
B query states, K next-state branches.

The state box is covered by a regular grid; between grid points values are multilinear
interpolations of the ``2^d`` surrounding points (periodic dims wrap around). Value
iteration is semi-Lagrangian: for every grid point x and action a the true (or model)
step gives s' (off the grid), and

    Q_g(x, a) = sum_k w_k [ r_g(s'_k) + gamma (1 - done_g(s'_k)) V_g(s'_k) ],

with r and done evaluated at s' exactly and V(s') interpolated from the grid; ``V`` is
``max_a Q`` (optimal) or ``sum_a pi(a | x, g) Q`` (a given policy). Torch only, no Ray.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor], Any]  # (states [n,d], actions [n]) -> [n,d] | ([K,n,d], [K])


@dataclass(frozen=True)
class Grid:
    """A regular grid over a box.

    Attributes:
        low, high: ``[d]`` box; on a periodic dim ``[low, high)`` is one period.
        shape: ``[d]`` points per dim (>= 2). Non-periodic dims: ``linspace(low, high, n)``
            (both ends on the grid); periodic dims: ``low + (high - low) i / n``, i < n.
        periodic: ``[d]`` bool.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]
    shape: tuple[int, ...]
    periodic: tuple[bool, ...] | None = None

    def __post_init__(self):
        d = len(self.shape)
        periodic = tuple(bool(p) for p in (self.periodic or (False,) * d))
        if not (len(self.low) == len(self.high) == len(periodic) == d):
            raise ValueError(f"low, high, shape and periodic must all have d entries, got {self.low}, {self.high}, {self.shape}, {periodic}")
        if min(self.shape) < 2:
            raise ValueError(f"every grid dim needs >= 2 points, got shape {self.shape}")
        if any(h <= lo for lo, h in zip(self.low, self.high)):
            raise ValueError(f"high must exceed low on every dim, got {self.low}, {self.high}")
        object.__setattr__(self, "low", tuple(float(x) for x in self.low))
        object.__setattr__(self, "high", tuple(float(x) for x in self.high))
        object.__setattr__(self, "shape", tuple(int(x) for x in self.shape))
        object.__setattr__(self, "periodic", periodic)

    @classmethod
    def for_dynamics(cls, dynamics: Any, shape: Sequence[int]) -> "Grid":
        """The grid over a ``ContinuousDynamics``' state box (its periodic dims wrap)."""
        return cls(tuple(dynamics.low), tuple(dynamics.high), tuple(shape), tuple(dynamics.periodic))

    @property
    def dim(self) -> int:
        """d."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """n."""
        return math.prod(self.shape)

    def axes(self, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        """The d coordinate vectors ``[shape[j]]``."""
        out = []
        for lo, hi, n, per in zip(self.low, self.high, self.shape, self.periodic):
            if per:
                out.append(lo + (hi - lo) * torch.arange(n, dtype=dtype) / n)
            else:
                out.append(torch.linspace(lo, hi, n, dtype=dtype))
        return out

    def points(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
        """``[n, d]`` grid points in row-major (C) order, matching ``Q[L, *shape, A]``."""
        mesh = torch.meshgrid(*self.axes(dtype), indexing="ij")
        return torch.stack([m.reshape(-1) for m in mesh], -1).to(device)

    def locate(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multilinear interpolation stencil of each state.

        Non-periodic coordinates are clamped to the box; periodic ones wrap.

        Args:
            states: ``[B, d]``.

        Returns:
            ``idx [B, 2^d]`` long flat grid indices and ``w [B, 2^d]`` weights (sum 1,
            differentiable in ``states``).
        """
        B = states.shape[0]
        idx = torch.zeros(B, 1, dtype=torch.long, device=states.device)
        w = torch.ones(B, 1, dtype=states.dtype, device=states.device)
        for j, (lo, hi, n, per) in enumerate(zip(self.low, self.high, self.shape, self.periodic)):
            s = states[:, j]
            if per:
                x = (s - lo) / (hi - lo) * n
                fl = torch.floor(x)
                f = x - fl
                i0 = torch.remainder(fl.long(), n)
                i1 = torch.remainder(i0 + 1, n)
            else:
                x = ((s - lo) / (hi - lo) * (n - 1)).clamp(0, n - 1)
                i0 = torch.floor(x).long().clamp(0, n - 2)
                f = x - i0.to(x.dtype)
                i1 = i0 + 1
            idx = torch.stack([idx * n + i0[:, None], idx * n + i1[:, None]], -1).reshape(B, -1)
            w = torch.stack([w * (1 - f)[:, None], w * f[:, None]], -1).reshape(B, -1)
        return idx, w

    def interpolate(self, table: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Interpolate a table ``[n, C]`` of grid values at ``states [B, d]`` -> ``[B, C]``."""
        idx, w = self.locate(states)
        vals = table.index_select(0, idx.reshape(-1)).reshape(*idx.shape, table.shape[1])
        return (vals * w.to(table.dtype)[..., None]).sum(1)


class GridQ:
    """Goal-conditioned Q interpolated from a grid table; differentiable in the state.

    ``q(states [B, d])`` -> ``[B, L, A]``; ``q(states, goal)`` with ``goal`` an int or
    ``[B]`` long -> ``[B, A]`` (the ``q_fn`` of P-learning).

    Args:
        Q: ``[L, *grid.shape, A]``.
        grid: the grid it lives on.
    """

    def __init__(self, Q: torch.Tensor, grid: Grid):
        Q = torch.as_tensor(Q)
        if tuple(Q.shape[1:-1]) != grid.shape:
            raise ValueError(f"Q must have shape [L, *{grid.shape}, A], got {tuple(Q.shape)}")
        self.grid = grid
        self.Q = Q
        self.num_goals = Q.shape[0]
        self.num_actions = Q.shape[-1]
        # [n, L * A]: one row per grid point, so an interpolation gathers whole rows.
        self.table = Q.reshape(self.num_goals, grid.size, self.num_actions).permute(1, 0, 2).reshape(grid.size, -1).contiguous()

    def to(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "GridQ":
        out = GridQ.__new__(GridQ)
        out.__dict__.update(self.__dict__)
        out.table = self.table.to(device=device, dtype=dtype or self.table.dtype)
        out.Q = self.Q.to(device=device, dtype=dtype or self.Q.dtype)
        return out

    def __call__(self, states: torch.Tensor, goal: int | torch.Tensor | None = None) -> torch.Tensor:
        q = self.grid.interpolate(self.table.to(states.dtype), states).reshape(-1, self.num_goals, self.num_actions)
        if goal is None:
            return q
        if isinstance(goal, int):
            return q[:, goal]
        goal = torch.as_tensor(goal, device=q.device).long().expand(q.shape[0])
        return q.gather(1, goal[:, None, None].expand(-1, 1, self.num_actions)).squeeze(1)

    def values(self, states: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` greedy values ``max_a Q(s, a, g)``."""
        return self(states).amax(-1)

    def greedy(self, states: torch.Tensor, goal: int | torch.Tensor = 0) -> torch.Tensor:
        """``[B]`` long greedy actions for ``goal``."""
        return self(states, goal).argmax(-1)


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n: int) -> torch.Tensor:
    """``[n, n]`` CSR matrix (built without invariant checks or the beta warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, (n, n), check_invariants=False)


def _branches(step_out: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise a step function's output to ``(next [K, n, d], weights [K])``."""
    if isinstance(step_out, tuple):
        nxt, wts = step_out
        return nxt.to(dtype), torch.as_tensor(wts, dtype=dtype, device=nxt.device)
    return step_out.to(dtype)[None], torch.ones(1, dtype=dtype, device=step_out.device)


def _policy_probs(policy: Any, points: torch.Tensor, L: int, A: int, dtype: torch.dtype) -> torch.Tensor:
    """A policy as probabilities ``[n, L, A]`` at the grid points."""
    n = points.shape[0]
    pi = policy(points) if callable(policy) else torch.as_tensor(policy, device=points.device)
    if not pi.is_floating_point():  # actions [L, ...]
        pi = pi.reshape(L, n)
        if pi.min() < 0 or pi.max() >= A:
            raise ValueError(f"policy actions must lie in [0, {A})")
        probs = torch.nn.functional.one_hot(pi.long(), A).to(dtype)
    else:
        probs = pi.reshape(L, n, A).to(dtype)
        if not torch.allclose(probs.sum(-1), torch.ones((), dtype=dtype, device=probs.device), atol=1e-5):
            raise ValueError("policy probabilities must sum to 1 over actions")
    return probs.permute(1, 0, 2).contiguous()


@torch.no_grad()
def grid_q(
    step_fn: StepFn,
    grid: Grid,
    rewards_fn: Callable[[torch.Tensor], torch.Tensor],
    terminal_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    gamma: float,
    policy: Any = None,
    *,
    num_actions: int,
    tol: float = 1e-6,
    max_iters: int = 5000,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    chunk: int = 1 << 18,
    info: dict | None = None,
) -> torch.Tensor:
    """Goal-conditioned Q on a grid by value iteration (optimal) or policy evaluation.

    Args:
        step_fn: ``(states [m, d], actions [m] long) -> next [m, d]`` (deterministic) or
            ``(next [K, m, d], weights [K])`` (a weighted branching, e.g. quadrature of
            the noise). Called once per action on chunks of grid points (float64).
        grid: the grid.
        rewards_fn: ``next_states [m, d] -> [m, L]`` rewards on arrival.
        terminal_fn: ``next_states [m, d] -> [m, L]`` bool; None = never terminal.
        gamma: discount in [0, 1).
        policy: None for the optimal Q; else the policy evaluated: actions ``[L, *shape]``
            long, probabilities ``[L, *shape, A]``, or a callable ``points [n, d] ->``
            one of those (flattened over the grid).
        num_actions: A.
        tol: stop when ``max |V_{k+1} - V_k| < tol``.
        max_iters: iteration cap.
        dtype, device: of the tables and the iteration.
        chunk: grid points per ``step_fn`` call.
        info: if given, filled with ``iterations``, ``residual``, ``seconds``, ``bytes``.

    Returns:
        ``Q [L, *grid.shape, A]`` (dtype, device).
    """
    if not 0 <= gamma < 1:
        raise ValueError(f"gamma must lie in [0, 1), got {gamma}")
    start = time.perf_counter()
    n, A = grid.size, int(num_actions)
    points = grid.points(torch.float64, device)
    # Per (action, branch): a CSR interpolation matrix T [n, n], rewards R, continuation C.
    T_list, R, C = [], [], []
    L = None
    nbytes = 0
    for a in range(A):
        nxt_chunks, wts = [], None
        for lo in range(0, n, chunk):
            pts = points[lo : lo + chunk]
            nxt, wts = _branches(step_fn(pts, torch.full((pts.shape[0],), a, dtype=torch.long, device=device)), torch.float64)
            nxt_chunks.append(nxt)
        nxt = torch.cat(nxt_chunks, 1)  # [K, n, d]
        for k in range(nxt.shape[0]):
            s2 = nxt[k]
            r = torch.as_tensor(rewards_fn(s2), device=device).to(dtype)
            if r.ndim == 1:
                r = r[:, None]
            L = r.shape[1]
            done = torch.zeros_like(r, dtype=torch.bool) if terminal_fn is None else torch.as_tensor(terminal_fn(s2), device=device).bool().reshape(r.shape)
            idx, w = grid.locate(s2)
            corners = idx.shape[1]
            crow = torch.arange(0, n * corners + 1, corners, dtype=torch.int64, device=device)
            T = _csr(crow, idx.reshape(-1), w.reshape(-1).to(dtype), n)
            wk = float(wts[k])
            T_list.append((a, T))
            R.append((a, wk * r))
            C.append((a, wk * gamma * (~done).to(dtype)))
            nbytes += idx.numel() * 8 + w.numel() * w.element_size() + 2 * r.numel() * r.element_size()
    earned = torch.stack([r.abs().amax(0) for _, r in R]).amax(0)  # [L]
    if (earned == 0).any():
        warnings.warn(f"goals {torch.nonzero(earned == 0).flatten().tolist()} pay no reward at any grid point's "
                      f"successor: the grid {grid.shape} is too coarse for them (their Q is 0)", stacklevel=2)
    probs = None if policy is None else _policy_probs(policy, points, L, A, dtype)  # [n, L, A]

    V = torch.zeros(n, L, dtype=dtype, device=device)
    Q = torch.zeros(A, n, L, dtype=dtype, device=device)
    residual, it = float("inf"), 0
    for it in range(1, max_iters + 1):
        Q.zero_()
        for (a, T), (_, r), (_, c) in zip(T_list, R, C):
            Q[a] += r + c * (T @ V)
        V_new = Q.amax(0) if probs is None else (Q.permute(1, 2, 0) * probs).sum(-1)
        residual = float((V_new - V).abs().max())
        V = V_new
        if residual < tol:
            break
    if info is not None:
        info.update(iterations=it, residual=residual, seconds=time.perf_counter() - start, bytes=nbytes)
    return Q.permute(2, 1, 0).reshape(L, *grid.shape, A).contiguous()


def grid_q_for_problem(problem: Any, grid_shape: Sequence[int], gamma: float, policy: Any = None,
                    step_fn: StepFn | None = None, quadrature: int = 5, **kwargs: Any) -> tuple[torch.Tensor, Grid]:
    """Grid Q of a ``qworld_envs`` ``ContinuousProblem``'s goals (true dynamics by default).

    Args:
        problem: the ``ContinuousProblem``.
        grid_shape: points per state dim.
        gamma: discount.
        policy: as in :func:`grid_q`.
        step_fn: dynamics to plan in (default: the true ones; stochastic true dynamics
            use a ``quadrature``-point Gauss-Hermite rule per noise dim).
        **kwargs: passed to :func:`grid_q`.

    Returns:
        ``(Q [L, *grid_shape, A], grid)``.
    """
    dyn = problem.dynamics
    grid = Grid.for_dynamics(dyn, grid_shape)
    if step_fn is None:
        def step_fn(s, a):
            return dyn.branches(s, a, quadrature)

    def rewards_fn(s2):
        return problem.goals.rewards_terminals(s2)[0]

    def terminal_fn(s2):
        return problem.goals.rewards_terminals(s2)[1]

    Q = grid_q(step_fn, grid, rewards_fn, terminal_fn, gamma, policy, num_actions=dyn.num_actions, **kwargs)
    return Q, grid
