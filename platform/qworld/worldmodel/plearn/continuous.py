"""P-learning for continuous envs: a world model extracted from frozen goal-conditioned Q.

Shapes: B batch, d state dims, A actions, L goals, K samples.

Deterministic dynamics: a successor network ``f(s, a) = s + Delta(s, a)`` is fitted so that
``m_g(f(s, a)) = Q_g(s, a)`` with ``m_g(s') = r_g(s') + gamma (1 - done_g(s')) max_a' Q(s', a', g)``
(the inverse Bellman equation); the loss is ``|m_g(f(s,a)) - Q_g(s,a)|`` (L1, default) or
its square, and its gradient flows through the frozen Q at s'. Stochastic dynamics: a
reparameterised Gaussian sampler ``s' = s + mu(s,a) + sigma(s,a) eps`` with the expectation
inside the residual estimated from K samples: ``(mean_k m_g(s'_k) - Q_g(s,a))^2``.

Torch only, no Ray. ``q_fn(states [B, d], goal [B] long) -> [B, A]`` is any differentiable
callable (``qworld.worldmodel.bellman_grid.GridQ``, or an agent's network behind an adapter); freeze
its parameters, only the model's are optimised.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from qworld_envs.continuous import wrap_periodic

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
        return wrap_periodic(nxt, self.periodic)


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
        return wrap_periodic(nxt, self.periodic)


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
    problem: Any,
    gamma: float,
    config: PLearnConfig | None = None,
    *,
    stochastic: bool = False,
    replay_states: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    callback: Callable[[int, SuccessorNet], dict] | None = None,
) -> PLearnResult:
    """Fit a world model to frozen Q by P-learning.

    Only the problem's goals (rewards on arrival), state box, reset distribution and number of
    actions are used; its true dynamics are never touched.

    Args:
        q_fn: ``(states [B, d], goal [B] long) -> [B, A]``, differentiable in the states.
        problem: a ``qworld_envs`` ``ContinuousProblem``.
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
    dyn, goals = problem.dynamics, problem.goals
    cls = GaussianSuccessor if stochastic else SuccessorNet
    extra = {"init_std": cfg.init_std} if stochastic else {}
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        model = cls(dyn.low, dyn.high, dyn.periodic, dyn.num_actions, hidden=cfg.hidden, layers=cfg.layers,
                    delta_scale=cfg.delta_scale, init_scale=cfg.init_scale, **extra).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    if cfg.state_sampling == "replay":
        if replay_states is None or len(replay_states) == 0:
            raise ValueError("state_sampling='replay' needs replay_states [M, d]")
        replay_states = torch.as_tensor(replay_states, dtype=torch.float32, device=device)
    L, A, B = goals.num_goals, dyn.num_actions, cfg.batch_size

    def loss_at(step: int) -> torch.Tensor:
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
                nxt = wrap_periodic(nxt + noise * model.delta_scale * eps, model.periodic)
            resid = m_values(q_fn, goals, nxt, g, gamma, cfg.smooth).float() - target
            loss = resid.abs().mean() if cfg.loss == "l1" else resid.square().mean()
        return loss

    return fit_model(model, cfg, loss_at, callback)


def fit_model(model: SuccessorNet, cfg: PLearnConfig, loss_at: Callable[[int], torch.Tensor],
              callback: Callable[[int, SuccessorNet], dict] | None = None) -> PLearnResult:
    """The optimisation every world-model fit shares (P-learning here, the supervised
    regression in ``qworld.worldmodel.experience``): Adam at ``cfg.lr`` cosine-decayed to 0 over
    ``cfg.steps`` steps of ``loss_at(step)``; the loss recorded every ``cfg.log_every`` steps
    (and at the last) with ``callback(step, model)``'s dict."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    history: dict[str, list] = {"step": [], "loss": []}
    start = time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        loss = loss_at(step)
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
