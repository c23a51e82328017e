"""P-learning for continuous envs: a world model extracted from frozen goal-conditioned Q.

Shapes: B batch, d state dims, A actions, L goals, K samples.

Deterministic dynamics: a successor network ``f(s, a) = s + Delta(s, a)`` is fitted so that
``m_g(f(s, a)) = Q_g(s, a)`` with ``m_g(s') = r_g(s') + gamma (1 - done_g(s')) max_a' Q(s', a', g)``
(the inverse Bellman equation); the loss is ``|m_g(f(s,a)) - Q_g(s,a)|`` (L1, default) or
its square, and its gradient flows through the frozen Q at s'. Stochastic dynamics: a
reparameterised Gaussian sampler ``s' = s + mu(s,a) + sigma(s,a) eps`` with the expectation
inside the residual estimated from K samples: ``(mean_k m_g(s'_k) - Q_g(s,a))^2``.

Torch only, no Ray. ``q_fn(states [B, d], goal [B] long) -> [B, A]`` is any differentiable
callable (``qworld.plearn.grid.GridQ``, or an agent's network behind an adapter); freeze
its parameters, only the model's are optimised.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from qworld import metrics as K
from qworld.planning_continuous import UNSEEN_GOAL_TASKS  # noqa: F401 - re-exported for the sweep spec

QFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

METHODS = ("successor", "sampler")  # deterministic successor network | Gaussian sampler
LOSSES = ("l1", "l2")
STATE_SAMPLING = ("uniform", "reset", "replay")


@dataclass(frozen=True)
class PLearnConfig:
    """Settings of one P-learning fit (defaults: the reference code's MountainCar run)."""

    steps: int = 20_000  # Adam steps
    batch_size: int = 4096  # (s, a, g) triples per step
    lr: float = 1e-4  # initial learning rate, cosine-decayed to 0 over `steps`
    loss: str = "l1"  # "l1": |m - Q| (reference) | "l2": (m - Q)^2
    hidden: int = 256  # MLP width
    layers: int = 2  # hidden layers (tanh)
    init_scale: float = 1e-3  # last-layer weights x this: the model starts at s' = s
    delta_scale: tuple[float, ...] | None = None  # output scale of Delta per dim; None: (high - low) / 20
    state_sampling: str = "uniform"  # "uniform" over the box | "reset" distribution | "replay" states given
    smooth: float | None = None  # sparse indicators in m_g become sigmoid((a - d) / (smooth a)), a the goal
    #   radius: without it the reward term passes no gradient and the fit stalls near the
    #   identity (0.1 on MountainCar and the Reacher, BENCHMARKS.md); None: the exact indicator
    all_goals: bool = True  # residuals of all L goals per (s, a) (q_fn(states, None) -> [B, L, A]); False: one random goal
    num_samples: int = 8  # K, samples per (s, a) for the stochastic sampler
    double_sample: bool = True  # sampler + l2: (mean_K/2 m - Q)(mean_K/2' m - Q) over two independent halves,
    #   an unbiased estimate of (E m - Q)^2; (mean_K m - Q)^2 adds Var(m)/K and shrinks the noise
    init_std: float = 0.1  # sampler: initial sigma, as a fraction of delta_scale
    anneal_noise: float = 0.0  # successor: std of Gaussian noise on s' (fraction of delta_scale), decayed
    #   linearly to 0 over `anneal_fraction` of the steps; a continuation that smooths the sharp
    #   edges of Q early, so the model is not caught in the local minima next to the identity
    anneal_fraction: float = 0.5
    seed: int = 0  # model init and sampling
    log_every: int = 0  # record the loss every this many steps (0: only the last)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.state_sampling not in STATE_SAMPLING:
            raise ValueError(f"state_sampling must be one of {STATE_SAMPLING}, got {self.state_sampling!r}")
        if self.steps < 1 or self.batch_size < 1 or self.num_samples < 1:
            raise ValueError("steps, batch_size and num_samples must be positive")
        if self.anneal_noise < 0 or not 0 < self.anneal_fraction <= 1:
            raise ValueError(f"anneal_noise must be >= 0 and anneal_fraction in (0, 1], got "
                             f"{self.anneal_noise}, {self.anneal_fraction}")
        if self.smooth is not None and self.smooth <= 0:
            raise ValueError(f"smooth must be None or > 0, got {self.smooth}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "PLearnConfig":
        """Build from a dict, rejecting unknown keys (``delta_scale`` lists become tuples)."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown P-learning options {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
        if options.get("delta_scale") is not None:
            options["delta_scale"] = tuple(float(x) for x in options["delta_scale"])
        return cls(**options)


def _wrap(x: torch.Tensor, periodic: torch.Tensor) -> torch.Tensor:
    return torch.where(periodic, torch.remainder(x + math.pi, 2 * math.pi) - math.pi, x)


class SuccessorNet(nn.Module):
    """Deterministic world model ``f(s, a) = s + delta_scale * MLP(enc(s) (+) one_hot(a))``.

    ``enc`` maps non-periodic dims to [-1, 1] over the box and periodic dims to (sin, cos).
    The last layer starts small, so the model starts at the identity.

    Args:
        low, high: ``[d]`` state box.
        periodic: ``[d]`` bool (outputs wrapped to [-pi, pi) there).
        num_actions: A.
        hidden, layers: MLP size (tanh).
        delta_scale: ``[d]`` output scale; None = ``(high - low) / 20``.
        init_scale: multiplier of the last layer's initial weights.
        out_dim: network outputs (default d; the sampler adds its scale outputs).
    """

    def __init__(self, low: Sequence[float], high: Sequence[float], periodic: Sequence[bool], num_actions: int,
                 hidden: int = 256, layers: int = 2, delta_scale: Sequence[float] | None = None,
                 init_scale: float = 1e-3, out_dim: int | None = None):
        super().__init__()
        d = len(low)
        low_t = torch.as_tensor(low, dtype=torch.float32)
        high_t = torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("low", low_t)
        self.register_buffer("high", high_t)
        self.register_buffer("periodic", torch.as_tensor(periodic, dtype=torch.bool))
        scale = (high_t - low_t) / 20 if delta_scale is None else torch.as_tensor(delta_scale, dtype=torch.float32)
        self.register_buffer("delta_scale", scale)
        self.state_dim, self.num_actions = d, int(num_actions)
        n_per = int(self.periodic.sum())
        in_dim = (d - n_per) + 2 * n_per + self.num_actions
        mods: list[nn.Module] = []
        width = in_dim
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        last = nn.Linear(width, out_dim or d)
        with torch.no_grad():
            last.weight.mul_(init_scale)
            last.bias.zero_()
        self.mlp = nn.Sequential(*mods, last)

    def encode(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim]`` network input."""
        s = states.to(self.low.dtype)
        per = self.periodic
        lin = 2 * (s[:, ~per] - self.low[~per]) / (self.high[~per] - self.low[~per]) - 1
        ang = s[:, per]
        onehot = nn.functional.one_hot(actions.long(), self.num_actions).to(s.dtype)
        return torch.cat([lin, torch.sin(ang), torch.cos(ang), onehot], -1)

    def raw(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.encode(states, actions))

    def delta(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``[B, d]`` predicted ``s' - s``."""
        return self.raw(states, actions)[:, : self.state_dim] * self.delta_scale

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``[B, d]`` predicted next states (the mean for the sampler)."""
        nxt = states.to(self.low.dtype) + self.delta(states, actions)
        return _wrap(nxt, self.periodic)


class GaussianSuccessor(SuccessorNet):
    """Stochastic world model ``s' = s + mu(s, a) + S(s, a) eps``, eps ~ N(0, I_d).

    ``mu = delta_scale * head_mu``; the scale ``S`` is lower-triangular (full covariance
    ``S S^T``, so noise shared by several dims, e.g. MountainCar's ``p' = p + v'``, is
    representable): ``S = init_std * diag(delta_scale) M`` with ``M`` lower-triangular,
    ``M_jj = exp(head_jj)``, ``M_jk = head_jk`` (j > k). Both heads start near 0, so
    ``S`` starts at ``init_std * diag(delta_scale)``. ``diagonal=True`` keeps ``M``
    diagonal (independent noise per dim).
    """

    def __init__(self, low: Sequence[float], *args: Any, init_std: float = 0.1, diagonal: bool = False, **kwargs: Any):
        d = len(low)
        n_off = 0 if diagonal else d * (d - 1) // 2
        # outputs: d mean, d log-diagonal, n_off off-diagonal entries of M
        super().__init__(low, *args, out_dim=2 * d + n_off, **kwargs)
        self.init_std = float(init_std)
        self.diagonal = diagonal
        rows, cols = torch.tril_indices(d, d, offset=-1)
        self.register_buffer("_off_rows", rows)
        self.register_buffer("_off_cols", cols)

    def _mu_scale(self, states: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.raw(states, actions)
        d = self.state_dim
        mu = raw[:, :d] * self.delta_scale
        M = torch.diag_embed(torch.exp(raw[:, d : 2 * d]))
        if not self.diagonal and d > 1:
            M = M.index_put((torch.arange(len(raw), device=raw.device)[:, None], self._off_rows[None], self._off_cols[None]),
                            raw[:, 2 * d :])
        S = self.init_std * self.delta_scale[:, None] * M  # [B, d, d]
        return mu, S

    def scale_tril(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``[B, d, d]`` lower-triangular S with ``Cov(s') = S S^T``."""
        return self._mu_scale(states, actions)[1]

    def std(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``[B, d]`` predicted marginal standard deviation of each dim of s'."""
        return self.scale_tril(states, actions).norm(dim=-1)

    def sample(self, states: torch.Tensor, actions: torch.Tensor, num_samples: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``[K, B, d]`` reparameterised next-state samples."""
        mu, S = self._mu_scale(states, actions)
        eps = torch.randn(num_samples, *mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        noise = torch.einsum("bij,kbj->kbi", S, eps)
        nxt = states.to(mu.dtype)[None] + mu[None] + noise
        return _wrap(nxt, self.periodic)


def m_values(q_fn: QFn, goals: Any, next_states: torch.Tensor, goal: torch.Tensor | None, gamma: float,
             smooth: float | None = None) -> torch.Tensor:
    """``m_g(s') = r_g(s') + gamma (1 - done_g(s')) max_a' Q(s', a', g)``.

    Args:
        q_fn: ``(states [B, d], goal [B] long) -> [B, A]``; with ``goal=None`` it must
            return every goal's ``[B, L, A]``.
        goals: has ``rewards_terminals(states [B, d], smooth) -> ([B, L], [B, L])``
            (a ``qworld_envs`` ``ContinuousGoals``).
        next_states: ``[B, d]``.
        goal: ``[B]`` long, or None for all goals.
        gamma: discount.
        smooth: sigmoid temperature of sparse indicators, a fraction of the goal radius
            (None: exact).

    Returns:
        ``[B]`` (``[B, L]`` when ``goal`` is None), differentiable in ``next_states``
        through Q (and the smoothed rewards).
    """
    r, done = goals.rewards_terminals(next_states, smooth)
    done = done.to(r.dtype)
    if goal is None:
        v = q_fn(next_states, None).amax(-1).to(r.dtype)  # [B, L]
        return r + gamma * (1 - done) * v
    r = r.gather(1, goal[:, None]).squeeze(1)
    done = done.gather(1, goal[:, None]).squeeze(1)
    v = q_fn(next_states, goal).amax(-1).to(r.dtype)
    return r + gamma * (1 - done) * v


@dataclass
class PLearnResult:
    """A fitted world model and its training record.

    Attributes:
        model: the ``SuccessorNet`` / ``GaussianSuccessor`` (eval mode, on its device).
        history: ``{"step": [...], "loss": [...]}``.
        config: the resolved config (dict).
        seconds: wall time of the fit.
    """

    model: SuccessorNet
    history: dict[str, list]
    config: dict
    seconds: float

    def step_fn(self, chunk: int = 1 << 16) -> ModelFn:
        """``(states [n, d], actions [n]) -> [n, d]`` mean next state, no grad, chunked
        (for planning and scoring); returns the input dtype."""
        model = self.model

        @torch.no_grad()
        def step(states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
            dev = model.low.device
            outs = [model(states[i : i + chunk].to(dev), actions[i : i + chunk].to(dev))
                    for i in range(0, states.shape[0], chunk)]
            return torch.cat(outs).to(device=states.device, dtype=states.dtype)

        return step


def p_learn(
    q_fn: QFn,
    task: Any,
    gamma: float,
    config: PLearnConfig | None = None,
    *,
    stochastic: bool = False,
    replay_states: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    callback: Callable[[int, SuccessorNet], dict] | None = None,
) -> PLearnResult:
    """Fit a world model to frozen Q by P-learning.

    Only the task's goals (rewards on arrival), state box, reset distribution and number of
    actions are used; its true dynamics are never touched.

    Args:
        q_fn: ``(states [B, d], goal [B] long) -> [B, A]``, differentiable in the states.
        task: a ``qworld_envs`` ``ContinuousTask``.
        gamma: the discount the Q-values were learned with.
        config: ``PLearnConfig`` (defaults if None).
        stochastic: fit the Gaussian sampler (else the deterministic successor network).
        replay_states: ``[M, d]`` states for ``state_sampling="replay"``.
        device: where to fit.
        callback: ``(step, model) -> dict`` called at each log step; its dicts are
            appended to the history.

    Returns:
        ``PLearnResult``.
    """
    cfg = config or PLearnConfig()
    dyn, goals = task.dynamics, task.goals
    cls = GaussianSuccessor if stochastic else SuccessorNet
    extra = {"init_std": cfg.init_std} if stochastic else {}
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        model = cls(dyn.low, dyn.high, dyn.periodic, dyn.num_actions, hidden=cfg.hidden, layers=cfg.layers,
                    delta_scale=cfg.delta_scale, init_scale=cfg.init_scale, **extra).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    if cfg.state_sampling == "replay":
        if replay_states is None or len(replay_states) == 0:
            raise ValueError("state_sampling='replay' needs replay_states [M, d]")
        replay_states = torch.as_tensor(replay_states, dtype=torch.float32, device=device)
    L, A, B = goals.num_goals, dyn.num_actions, cfg.batch_size
    history: dict[str, list] = {"step": [], "loss": []}
    start = time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        with torch.no_grad():
            if cfg.state_sampling == "uniform":
                s = dyn.uniform_states(B, gen, torch.float32, device)
            elif cfg.state_sampling == "reset":
                s = dyn.reset_states(B, gen, torch.float32, device)
            else:
                s = replay_states[torch.randint(len(replay_states), (B,), generator=gen, device=device)]
            a = torch.randint(A, (B,), generator=gen, device=device)
            if cfg.all_goals:
                g = None
                target = q_fn(s, None).gather(2, a[:, None, None].expand(-1, L, 1)).squeeze(2).float()  # [B, L]
            else:
                g = torch.randint(L, (B,), generator=gen, device=device)
                target = q_fn(s, g).gather(1, a[:, None]).squeeze(1).float()  # [B]
        if stochastic:
            nxt = model.sample(s, a, cfg.num_samples, gen)  # [K, B, d]
            g_rep = None if g is None else g.repeat(cfg.num_samples)
            m = m_values(q_fn, goals, nxt.reshape(-1, nxt.shape[-1]), g_rep, gamma, cfg.smooth)
            m = m.reshape(cfg.num_samples, *target.shape).float()
            if cfg.loss == "l2" and cfg.double_sample and cfg.num_samples >= 2:
                half = cfg.num_samples // 2
                loss = ((m[:half].mean(0) - target) * (m[half : 2 * half].mean(0) - target)).mean()
            else:
                resid = m.mean(0) - target
                loss = resid.abs().mean() if cfg.loss == "l1" else resid.square().mean()
        else:
            nxt = model(s, a)
            noise = cfg.anneal_noise * (1.0 - step / (cfg.anneal_fraction * cfg.steps))
            if noise > 0:
                eps = torch.randn(nxt.shape, generator=gen, device=device, dtype=nxt.dtype)
                nxt = _wrap(nxt + noise * model.delta_scale * eps, model.periodic)
            resid = m_values(q_fn, goals, nxt, g, gamma, cfg.smooth).float() - target
            loss = resid.abs().mean() if cfg.loss == "l1" else resid.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == cfg.steps or (cfg.log_every and step % cfg.log_every == 0):
            history["step"].append(step)
            history["loss"].append(float(loss.detach()))
            if callback is not None:
                model.eval()
                for key, val in callback(step, model).items():
                    history.setdefault(key, []).append(val)
                model.train()
    model.eval()
    return PLearnResult(model=model, history=history, config=asdict(cfg), seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------
def _nmse(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """``mean((pred - truth)^2) / Var(truth)`` (float64)."""
    pred, truth = pred.double(), truth.double()
    var = float(truth.var(unbiased=False))
    mse = float((pred - truth).square().mean())
    if var == 0.0:
        return float("nan") if mse == 0.0 else float("inf")
    return mse / var


def _wrapped_err(pred: torch.Tensor, truth: torch.Tensor, periodic: Sequence[bool]) -> torch.Tensor:
    err = pred - truth
    if any(periodic):
        err = _wrap(err, torch.as_tensor(periodic, device=err.device))
    return err


def successor_scores(pred_next: torch.Tensor, true_next: torch.Tensor, states: torch.Tensor,
                     periodic: Sequence[bool] | None = None, state_names: Sequence[str] | None = None) -> dict:
    """NMSE of predicted next states and state changes against the truth.

    Args:
        pred_next, true_next, states: ``[B, d]``.
        periodic: ``[d]`` angle dims (errors and changes wrapped there).
        state_names: ``[d]`` names used in the per-dim keys (default "0", "1", ...).

    Returns:
        ``{wm_nmse: mean over dims of NMSE(s'_j), wm_delta_nmse_<name>: NMSE(Delta_j)}``,
        ``Delta = s' - s``; NMSE = MSE / Var(truth) per dim.
    """
    d = states.shape[1]
    periodic = tuple(periodic or (False,) * d)
    names = tuple(state_names or (str(j) for j in range(d)))
    pred_next, true_next, states = pred_next.double(), true_next.double(), states.double()
    err = _wrapped_err(pred_next, true_next, periodic)  # pred - truth, wrapped
    true_delta = _wrapped_err(true_next, states, periodic)
    out, per_dim = {}, []
    for j in range(d):
        var_next = float(true_next[:, j].var(unbiased=False))
        mse = float(err[:, j].square().mean())
        per_dim.append(mse / var_next if var_next > 0 else (float("nan") if mse == 0 else float("inf")))
        out[f"{K.WM_DELTA_NMSE}_{names[j]}"] = _nmse(true_delta[:, j] + err[:, j], true_delta[:, j])
    out[K.WM_NMSE] = float(np.mean(per_dim))
    return out


def _scores_with_baselines(preds: Mapping[str, torch.Tensor], true_next: torch.Tensor, states: torch.Tensor,
                           periodic: Sequence[bool] | None, state_names: Sequence[str] | None) -> dict:
    """``successor_scores`` of every prediction, keys prefixed by its name ("" = the model)."""
    out = {}
    for prefix, pred in preds.items():
        scores = successor_scores(pred, true_next, states, periodic, state_names)
        out.update({(f"{prefix}/{k}" if prefix else k): v for k, v in scores.items()})
    return out


def _predictions(model_fn: ModelFn, no_force_fn: ModelFn | None, states: torch.Tensor,
                 actions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Next states of the model ("") and of the baselines, keyed by score prefix."""
    preds = {"": model_fn(states, actions), K.BASELINE_IDENTITY: states}
    if no_force_fn is not None:
        preds[K.BASELINE_NO_FORCE] = no_force_fn(states, actions)
    return preds


def score_successor(model_fn: ModelFn, true_fn: ModelFn, states: torch.Tensor, actions: torch.Tensor, *,
                    no_force_fn: ModelFn | None = None, periodic: Sequence[bool] | None = None,
                    state_names: Sequence[str] | None = None) -> dict:
    """Score a world model's next states, with the baselines next to it.

    Args:
        model_fn: ``(states [B, d], actions [B]) -> [B, d]`` predicted (mean) next states.
        true_fn: the true (mean) next states, same signature.
        states, actions: ``[B, d]``, ``[B]`` where to compare.
        no_force_fn: the "no-force" baseline model (MountainCar: force 0; Reacher: tau = 0).
        periodic, state_names: as in :func:`successor_scores`.

    Returns:
        The model's ``successor_scores`` keys, the same keys prefixed ``identity/``
        (baseline s' = s) and, with ``no_force_fn``, prefixed ``no_force/``.
    """
    with torch.no_grad():
        preds = _predictions(model_fn, no_force_fn, states, actions)
        return _scores_with_baselines(preds, true_fn(states, actions).double(), states, periodic, state_names)


def true_mean_fn(dynamics: Any, quadrature: int = 9) -> ModelFn:
    """``(states, actions) -> [B, d]`` expected next state of the true dynamics
    (Gauss-Hermite over the noise; exact for deterministic dynamics)."""

    def fn(states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        nxt, w = dynamics.branches(states.double(), actions, quadrature)
        if any(dynamics.periodic):  # average the wrapped changes, not the wrapped angles
            delta = torch.stack([dynamics.delta(n, states.double()) for n in nxt])
            return _wrap(states.double() + (w[:, None, None] * delta).sum(0), torch.as_tensor(dynamics.periodic))
        return (w[:, None, None] * nxt).sum(0)

    return fn


INTERIOR = "interior"  # key prefix f"{INTERIOR}/<metric>": scores on the interior transitions only


def _inside_box(dynamics: Any, next_states: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: next states strictly inside the state box on every non-periodic dim."""
    ok = torch.ones(next_states.shape[0], dtype=torch.bool, device=next_states.device)
    for j, (lo, hi, per) in enumerate(zip(dynamics.low, dynamics.high, dynamics.periodic)):
        if not per:
            ok &= (next_states[:, j] > lo) & (next_states[:, j] < hi)
    return ok


def interior_mask(dynamics: Any, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: transitions whose true (mean) next state lies strictly inside the state
    box on every non-periodic dim, i.e. no wall, speed limit or joint limit acted.

    MountainCar's inelastic left wall (``v' = 0``) is the case in point: about 3% of uniform
    (s, a) hit it, their velocity change is up to 0.07 (the force is 0.001), so they hold
    most of the variance of Delta v over the box, and Q barely identifies ``v'`` there
    (every ``v' < -0.003`` at the wall leads to the same next-next state).
    """
    return _inside_box(dynamics, true_mean_fn(dynamics)(states.double(), actions))


def _transitions(dynamics: Any, num_states: int, seed: int,
                 states: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where models are compared: ``states`` (default uniform over the box) as float64
    ``[B, d]`` and uniform actions ``[B]``, both from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    if states is None:
        states = dynamics.uniform_states(num_states, gen)
    return states.double(), torch.randint(dynamics.num_actions, (states.shape[0],), generator=gen)


def _interior_scores(keep: torch.Tensor, score_rows: Callable[[torch.Tensor], dict]) -> dict:
    """``score_rows(keep)`` under the ``interior/`` prefix, with the interior fraction."""
    out = {f"{INTERIOR}/fraction": float(keep.double().mean())}
    if keep.sum() > 1:
        out.update({f"{INTERIOR}/{k}": v for k, v in score_rows(keep).items()})
    return out


def score_task_model(model_fn: ModelFn, task: Any, num_states: int = 4096, seed: int = 0,
                     states: torch.Tensor | None = None, interior: bool = False) -> dict:
    """:func:`score_successor` of a model of ``task``'s dynamics on states uniform over the
    box (or given ``[B, d]``) and uniform actions, with both baselines.

    With ``interior=True`` the same scores restricted to the :func:`interior_mask`
    transitions are added under the prefix ``interior/`` (e.g.
    ``interior/wm_delta_nmse_v``, ``interior/no_force/wm_delta_nmse_v``) with their
    fraction ``interior/fraction``.
    """
    dyn = task.dynamics
    states, actions = _transitions(dyn, num_states, seed, states)
    with torch.no_grad():  # every model is stepped once; the interior scores reuse the rows
        true_next = true_mean_fn(dyn)(states, actions).double()
        preds = _predictions(model_fn, dyn.no_force_fn, states, actions)

    def score(rows: Any) -> dict:
        return _scores_with_baselines({k: p[rows] for k, p in preds.items()}, true_next[rows], states[rows],
                                      dyn.periodic, dyn.state_names)

    out = score(slice(None))
    if interior:
        out.update(_interior_scores(_inside_box(dyn, true_next), score))
    return out


def model_agreement(model_a: ModelFn, model_b: ModelFn, task: Any, num_states: int = 4096, seed: int = 0,
                    states: torch.Tensor | None = None) -> dict:
    """How closely two world models of one env agree (the paper's check: the model extracted
    from position goals against the one from velocity goals, NMSE 1.7e-4).

    Both models predict next states for the same states (uniform over the box, or given
    ``[B, d]``) and uniform actions; model b is the reference of :func:`successor_scores`.

    Returns:
        ``{wm_nmse, wm_delta_nmse_<dim>, interior/...}``: NMSE of a's next states and state
        changes against b's (per dim, normalised by the variance of b's), over all states
        and over the states whose *true* next state is interior (see :func:`interior_mask`),
        with ``interior/fraction``.
    """
    dyn = task.dynamics
    states, actions = _transitions(dyn, num_states, seed, states)
    with torch.no_grad():
        pred_a = model_a(states, actions).double()
        pred_b = model_b(states, actions).double()

    def score(rows: Any) -> dict:
        return successor_scores(pred_a[rows], pred_b[rows], states[rows], dyn.periodic, dyn.state_names)

    return {**score(slice(None)), **_interior_scores(interior_mask(dyn, states, actions), score)}


# --------------------------------------------------------------------------------------
# scoring a trained agent's checkpoint (called by qworld.sweep.score)
# --------------------------------------------------------------------------------------
def agent_q_fn(qfun: Any, task: Any) -> QFn:
    """Adapt an agent to ``q_fn(states [B, d], goal [B]) -> [B, A]`` (``goal=None``: ``[B, L, A]``).

    Accepted agents, tried in this order:

    - a ``qworld.agents.QFunction`` (or anything with a ``.module`` that has
      ``q_all_goals(obs [B, obs_dim]) -> [B, L, A]`` and ``q_goals(obs, goal [B]) -> [B, A]``,
      the ``PQNTorchRLModule``): the module is deep-copied, frozen
      (``requires_grad=False``) and put in eval mode, so P-learning's gradients flow to the
      states only and a live training module is never touched;
    - an object with ``q_values(obs [B, obs_dim + goal_dim]) -> [B, A]``, or such a
      callable itself (observation ``concat(observe(s), goal_features[g])``).

    States are observed with the task's ``observe`` (float32), exactly as the envs do;
    outputs are on the states' device.

    Raises:
        ValueError: the module's goal count or observation size does not match the task.
    """
    dyn, feats = task.dynamics, task.goals.features
    module = getattr(qfun, "module", None)
    if module is not None and hasattr(module, "q_all_goals"):
        if int(module.num_goals) != task.goals.num_goals or int(module.obs_dim) != dyn.obs_dim:
            raise ValueError(f"agent has L={module.num_goals}, obs_dim={module.obs_dim}; the task "
                             f"{task.env_id} has L={task.goals.num_goals}, obs_dim={dyn.obs_dim}")
        frozen = copy.deepcopy(module).eval().requires_grad_(False)
        param = next(frozen.parameters())

        def module_q_fn(states: torch.Tensor, goal: torch.Tensor | None) -> torch.Tensor:
            obs = dyn.observe(states).to(device=param.device, dtype=param.dtype)
            if goal is None:
                out = frozen.q_all_goals(obs)  # [B, L, A]
            else:
                goal = torch.as_tensor(goal, device=obs.device).long().expand(obs.shape[0])
                out = frozen.q_goals(obs, goal)  # [B, A]
            return out.to(states.device)

        return module_q_fn

    net = getattr(qfun, "q_values", qfun)

    def q_fn(states: torch.Tensor, goal: torch.Tensor | None) -> torch.Tensor:
        obs = dyn.observe(states).float()
        f = feats.to(obs.device)
        if goal is None:  # every goal: [B, L, A]
            return torch.stack([net(torch.cat([obs, f[g].expand(len(obs), -1)], -1)) for g in range(len(f))], 1)
        goal = torch.as_tensor(goal, device=obs.device).long().expand(obs.shape[0])
        return net(torch.cat([obs, f[goal]], -1))

    return q_fn


def score_checkpoint_continuous(qfun: Any, config: Mapping[str, Any], base: Mapping[str, Any],
                                methods: Sequence[str], tasks: Sequence[str],
                                options: Mapping[str, Mapping[str, Any]] | None = None,
                                *, fits: dict | None = None) -> list[dict]:
    """Rows of (checkpoint, method) for a continuous env: Q NMSE, world-model scores with
    baselines, and unseen-goal return ratios.

    Args:
        qfun: the loaded agent: a ``qworld.agents.QFunction`` (its torch module is the
            differentiable Q of P-learning) or see :func:`agent_q_fn`.
        config: the trial's resolved config (``env_id``, ``env_kwargs``, ``gamma``).
        base: columns every row carries.
        methods: subset of ``METHODS``.
        tasks: unseen-goal task names of ``UNSEEN_GOAL_TASKS[env_id]``.
        options: per method, ``PLearnConfig`` fields (the sampler defaults to ``loss="l2"``)
            plus ``grid_shape`` (planning grid) and ``num_resets``; under the key
            ``"q_nmse"``: ``grid_shape`` (0 / None skips the Q NMSE; the default is the
            env's planning grid for torch dynamics, and none for MuJoCo, whose grid would
            be stepped in a Python loop).
        fits: if given, filled with ``{method: PLearnResult}`` (the fitted world models).

    Returns:
        One dict per method (its ``error`` column set if it failed) with ``q_nmse``, the
        :func:`score_task_model` keys (``wm_nmse``, ``wm_delta_nmse_<dim>``, the
        ``identity/`` and ``no_force/`` baselines, and the same on interior transitions
        under ``interior/``), ``fit_seconds``, and per task ``<task>/return_ratio``,
        ``<task>/return_wm``, ``<task>/return_star``, ``<task>/plan_success``.
    """
    import traceback

    from qworld.planning_continuous import default_grid_shape, evaluate_unseen_goal
    from qworld.plearn.grid import GridQ, grid_q_for_task
    from qworld_envs import make_continuous_task

    options = dict(options or {})
    task = make_continuous_task(config["env_id"], **dict(config.get("env_kwargs") or {}))
    gamma = float(config["gamma"])
    q_fn = agent_q_fn(qfun, task)
    shared = dict(base)
    q_error = None
    q_opts = dict(options.get("q_nmse", {}))
    q_shape = q_opts.get("grid_shape", default_grid_shape(task.env_id) if task.dynamics.differentiable else None)
    if q_shape:
        try:  # the agent's Q against the exact Q of its own greedy policy
            grid_shape = tuple(q_shape)

            def greedy(points: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return torch.stack([q_fn(points.float(), torch.full((len(points),), g)).argmax(-1)
                                        for g in range(task.goals.num_goals)])

            Q_pi, grid = grid_q_for_task(task, grid_shape, gamma, policy=greedy)
            q_pi = GridQ(Q_pi, grid)
            gen = torch.Generator().manual_seed(0)
            s = task.dynamics.uniform_states(4096, gen)
            g = torch.randint(task.goals.num_goals, (4096,), generator=gen)
            with torch.no_grad():
                shared[K.Q_NMSE] = _nmse(q_fn(s.float(), g).double(), q_pi(s, g).double())
        except Exception as exc:  # noqa: BLE001 - the world-model scores still count
            shared[K.Q_NMSE] = float("nan")
            q_error = "q_nmse: " + traceback.format_exception_only(type(exc), exc)[-1].strip()[:2000]
    rows = []
    for method in methods:
        row = {**shared, K.METHOD: method, K.ERROR: q_error}
        try:
            if method not in METHODS:
                raise ValueError(f"unknown continuous method {method!r}; known: {METHODS}")
            opts = dict(options.get(method, {}))
            grid_shape = opts.pop("grid_shape", None)
            num_resets = int(opts.pop("num_resets", 512))
            if method == "sampler":
                opts.setdefault("loss", "l2")  # the double-sampled square is unbiased; L1 shrinks the noise
            cfg = PLearnConfig.from_options(opts)
            fit = p_learn(q_fn, task, gamma, cfg, stochastic=(method == "sampler"))
            if fits is not None:
                fits[method] = fit
            row[K.FIT_SECONDS] = fit.seconds
            row.update(score_task_model(fit.step_fn(), task, interior=True))
            for name in tasks:
                res = evaluate_unseen_goal(task, name, fit.step_fn(), gamma=gamma, grid_shape=grid_shape,
                                           num_resets=num_resets)
                row.update({f"{name}/{k}": v for k, v in res.items()})
        except Exception as exc:  # noqa: BLE001 - one method failing must not lose the others
            row[K.ERROR] = traceback.format_exception_only(type(exc), exc)[-1].strip()[:2000]
        rows.append(row)
    return rows
