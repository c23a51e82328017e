"""Replayed windows: MR.Q's fixed-length batch from the replay buffer.

The buffer (:class:`qworld.agents.replay_buffer.WindowEpisodeReplayBuffer`, RLlib's
``local_replay_buffer``) draws window starts uniformly among its transitions and follows
each episode with array indexing; a window is shorter than H where its episode ends
(terminated, truncated, or not yet continued) and is padded after its end with ``valid``
False (the padded observations repeat the last one).

The env observes ``concat(state obs, goal features)``; the window keeps the state part
(the buffer's ``obs_dim``). Transition k's rewards / terminals of every goal are
``infos[k + 1]["rewards"]`` / ``["terminals"]`` (the info the env returned with
``s_{k+1}``; CONTRACTS.md).
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np

from qworld.agents.mrq.learner import ACTIONS, OBS, REWARDS, TERMINALS, VALID


def abs_reward_sum(episodes: Sequence[Any]) -> tuple:
    """``(sum |r|, count)`` over every goal's reward of every transition in ``episodes``."""
    total, count = 0.0, 0
    for e in episodes:
        for info in list(e.get_infos())[1:]:
            r = np.asarray(info["rewards"], dtype=np.float64)
            total += float(np.abs(r).sum())
            count += r.size
    return total, count


def sample_windows(buffer: Any, num_windows: int, horizon: int, obs_dim: int, num_goals: int) -> Dict[str, np.ndarray]:
    """``num_windows`` windows of ``horizon`` transitions:
    ``{obs [N, H+1, obs_dim], actions [N, H], rewards / terminals [N, H, L], valid [N, H]}``."""
    out = buffer.sample(batch_size_B=int(num_windows), batch_length_T=int(horizon))
    assert out[OBS].shape[-1] == obs_dim and out[REWARDS].shape[-1] == num_goals, (out[OBS].shape, out[REWARDS].shape)
    return {k: out[k] for k in (OBS, ACTIONS, REWARDS, TERMINALS, VALID)}
