"""What replay sampling costs MR.Q and D3G per iteration, and what their checkpoints cost on
disk with the replay buffer (issue 24).

MR.Q (defaults, windy FourRooms, 4 indicator goals) trains past ``learning_starts`` and a
few learning iterations; every rollout also goes into RLlib's ``EpisodeReplayBuffer`` so the
old sampler (one ``episode.slice`` per window + a Python loop, as ``mrq/replay.py`` did
before) can be timed on the same data as the array buffer. Per learning iteration: process
CPU s of ``train()`` and of its replay sampling (``replay_batch``), the share. Then the old and new samplers, each drawing one iteration's windows
(``updates_per_iteration x batch_size`` windows of ``max(enc_horizon, n_step)``
transitions), CPU s. Checkpoints: ``save_to_path`` with and without the buffer (bytes of
the whole directory and of its ``algorithm_state.pkl``), and the arrays of a full buffer at the
default capacity from their dtypes; the same for D3G (defaults, MountainCar).

Usage::

    python benchmarks/replay_windows.py [--learn-iters 4]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np
import torch


def old_sample_windows(buffer, num_windows: int, horizon: int, obs_dim: int, num_goals: int) -> dict:
    """The sampler MR.Q used before (``mrq/replay.py`` at 31119a5): RLlib slices -> windows."""
    out = []
    while len(out) < num_windows:
        got = buffer.sample(batch_size_B=(num_windows - len(out)) * (horizon + 1), batch_length_T=horizon,
                            n_step=1, sample_episodes=True, include_infos=True, lookback=0)
        out.extend(s for s in got if len(s) > 0)
    slices = out[:num_windows]
    N, H, L = len(slices), horizon, num_goals
    obs = np.zeros((N, H + 1, obs_dim), np.float32)
    actions = np.zeros((N, H), np.int64)
    rewards = np.zeros((N, H, L), np.float32)
    terminals = np.zeros((N, H, L), np.float32)
    valid = np.zeros((N, H), bool)
    for i, s in enumerate(slices):
        k = min(len(s), H)
        o = np.asarray(s.get_observations(), dtype=np.float32).reshape(len(s) + 1, -1)[: k + 1, :obs_dim]
        obs[i, : k + 1] = o
        obs[i, k + 1:] = o[-1]
        actions[i, :k] = np.asarray(s.get_actions()).reshape(-1)[:k]
        infos = list(s.get_infos())[1: k + 1]
        rewards[i, :k] = np.stack([np.asarray(f["rewards"], np.float32) for f in infos])
        terminals[i, :k] = np.stack([np.asarray(f["terminals"], np.float32) for f in infos])
        valid[i, :k] = True
    return {"obs": obs, "valid": valid}


def dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file())


def checkpoint_bytes(algo, tmp: pathlib.Path, name: str) -> dict:
    out = {}
    for with_buffer in (True, False):
        object.__setattr__(algo.config, "checkpoint_replay_buffer", with_buffer)  # the config is frozen
        path = pathlib.Path(algo.save_to_path(str(tmp / f"{name}-{with_buffer}")))
        key = "with_buffer" if with_buffer else "without_buffer"
        out[key] = {"dir_bytes": dir_bytes(path), "algorithm_state_pkl_bytes": (path / "algorithm_state.pkl").stat().st_size}
    object.__setattr__(algo.config, "checkpoint_replay_buffer", True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learn-iters", type=int, default=4)
    parser.add_argument("--d3g-iters", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import ray
    from ray.rllib.utils.replay_buffers.episode_replay_buffer import EpisodeReplayBuffer

    from qworld.agents.d3g import D3GConfig
    from qworld.agents.mrq import MRQConfig

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    report: dict = {}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="replay_windows_"))

    # ---------------------------------------------------------------- MR.Q
    cfg = MRQConfig().training(env_kwargs={"variant": "windy", "goal_type": "indicator", "num_goals": 4}).debugging(seed=0)
    algo = cfg.build_algo()
    old = EpisodeReplayBuffer(capacity=int(cfg.buffer_capacity))
    real = algo.sample_episodes

    def both():
        episodes, metrics = real()
        old.add(episodes)
        return episodes, metrics

    algo.sample_episodes = both
    real_batch = algo.replay_batch
    spent: list = []

    def timed(num):
        t0 = time.process_time()
        out = real_batch(num)
        spent.append(time.process_time() - t0)
        return out

    algo.replay_batch = timed
    iters = []
    while len(iters) < args.learn_iters:
        before = len(spent)
        t0 = time.process_time()
        algo.train()
        cpu = time.process_time() - t0
        if len(spent) > before:
            iters.append({"iteration_cpu_s": round(cpu, 3), "replay_sampling_cpu_s": round(spent[-1], 4),
                          "share": round(spent[-1] / cpu, 4)})
    p = cfg.problem()
    n, H = int(cfg.updates_per_iteration) * int(cfg.batch_size), cfg.horizon
    t0 = time.process_time()
    old_sample_windows(old, n, H, p.obs_dim, p.num_goals)
    old_cpu = time.process_time() - t0
    t0 = time.process_time()
    algo.replay_buffer.sample(batch_size_B=n, batch_length_T=H)
    new_cpu = time.process_time() - t0
    buf = algo.replay_buffer
    report["mrq"] = {
        "env_steps": algo.env_steps_sampled(), "buffer_transitions": buf.get_num_timesteps(),
        "learning_iterations": iters,
        "windows_per_iteration": n, "horizon": H,
        "old_sampler_cpu_s": round(old_cpu, 3), "new_sampler_cpu_s": round(new_cpu, 4),
        "checkpoint": checkpoint_bytes(algo, tmp, "mrq"),
        "full_buffer_bytes": buf.nbytes_when_full(p.obs_dim, p.num_goals), "capacity": buf.capacity,
    }
    algo.stop()

    # ---------------------------------------------------------------- D3G
    cfg = D3GConfig().debugging(seed=0)
    algo = cfg.build_algo()
    real_batch = algo.replay_batch
    spent = []
    algo.replay_batch = timed
    d3g_iters = []
    for _ in range(args.d3g_iters):
        before = len(spent)
        t0 = time.process_time()
        algo.train()
        cpu = time.process_time() - t0
        if len(spent) > before:
            d3g_iters.append({"iteration_cpu_s": round(cpu, 3), "replay_sampling_cpu_s": round(spent[-1], 4),
                              "share": round(spent[-1] / cpu, 4)})
    p = cfg.problem()
    buf = algo.replay_buffer
    report["d3g"] = {
        "env_steps": algo.env_steps_sampled(), "buffer_transitions": buf.get_num_timesteps(),
        "learning_iterations": d3g_iters[-3:],
        "checkpoint": checkpoint_bytes(algo, tmp, "d3g"),
        "full_buffer_bytes": buf.nbytes_when_full(int(buf._a["obs"].shape[1]), p.num_goals), "capacity": buf.capacity,
        "state_dim": int(buf._a["obs"].shape[1]), "num_goals": p.num_goals,
    }
    algo.stop()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
