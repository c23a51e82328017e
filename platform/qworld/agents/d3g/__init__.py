"""Goal-conditioned D3G (Edwards et al., ICML 2020) on RLlib's new API stack.

``D3GConfig`` / ``D3G`` (config, algorithm: RLlib's standard env runner, an RLlib
``EpisodeReplayBuffer`` in arrays: ``qworld.agents.replay_buffer``), ``D3GTorchLearner`` (critic, forward, inverse and delayed
proposal losses), ``D3GTorchRLModule`` (forward model f, inverse model I, proposal tau,
twin critic Q(s, s', g); the QFunction API and ``forward_model_states``), the pure
targets / losses in ``losses`` and the inverse observations in ``unobserve``.

For a registry of algorithms: ``"d3g": (D3G, D3GConfig)``.
"""

from qworld.agents.d3g.d3g import ALGORITHM_NAME, D3G, D3GConfig
from qworld.agents.d3g.learner import D3GTorchLearner, d3g_losses
from qworld.agents.d3g.module import D3GTorchRLModule

__all__ = ["ALGORITHM_NAME", "D3G", "D3GConfig", "D3GTorchLearner", "D3GTorchRLModule", "d3g_losses"]
