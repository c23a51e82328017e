"""The private Ray / RLlib names qworld uses, pinned: every one lives in
``qworld.agents.rllib_private``, and a Ray upgrade that changes one fails here, not silently
in training.

1. ``TorchLearner._get_clip_function`` (a private static method): PQN replaces the gradient
   clip of ``Learner.postprocess_gradients_for_module`` with a fused global-norm clip that
   gives RLlib's numbers (``rllib_private.clip_gradients_fused``);
2. ``Checkpointable._check_component`` / ``_get_subcomponents``: which components a
   ``get_state(components=..., not_components=...)`` asks for;
3. ``ray.air.integrations.wandb._clean_log``: what Ray's W&B logger logs of a config/result.

Everything else goes through public API: ``LearnerGroup.foreach_learner`` for the live module
(``QworldAlgorithmMixin.live_module``), ``Learner.compute_losses`` for MR.Q's per-step target
sync, ``Learner.module`` / ``Learner.device``, ``EnvRunnerGroup.foreach_env_runner`` for the
episode-replay families' sampling; the last test keeps it so.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import torch
from ray.rllib.core.learner.learner import Learner
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.checkpoints import Checkpointable
from ray.rllib.utils.torch_utils import clip_gradients

from qworld.agents import rllib_private
from qworld.agents.pqn.learner import PQNTorchLearner
from qworld.agents.rllib_private import clip_gradients_fused

torch.set_num_threads(1)


# ---------------------------------------------------------------------- 1. gradient clip
def test_rllib_still_clips_through_get_clip_function():
    source = inspect.getsource(Learner.postprocess_gradients_for_module)
    assert "self._get_clip_function()(" in source, "RLlib no longer clips through _get_clip_function"
    assert isinstance(inspect.getattr_static(TorchLearner, "_get_clip_function"), staticmethod)
    assert inspect.signature(TorchLearner._get_clip_function()).parameters.keys() >= {
        "gradients_dict", "grad_clip", "grad_clip_by"}
    assert PQNTorchLearner._get_clip_function() is clip_gradients_fused


def test_the_fused_clip_gives_rllibs_numbers():
    gen = torch.Generator().manual_seed(0)
    grads = {i: torch.randn(5, 7, generator=gen) * 10 for i in range(4)}
    grads[4] = torch.tensor([float("inf"), 1.0])  # RLlib reads a non-finite norm as 1e9
    for case in ({k: v for k, v in grads.items() if k != 4}, grads):
        ours = {k: v.clone() for k, v in case.items()}
        theirs = {k: v.clone() for k, v in case.items()}
        norm_ours = clip_gradients_fused(ours, grad_clip=1.0, grad_clip_by="global_norm")
        norm_theirs = clip_gradients(theirs, grad_clip=1.0, grad_clip_by="global_norm")
        torch.testing.assert_close(norm_ours, torch.as_tensor(norm_theirs, dtype=norm_ours.dtype))
        for k in case:
            torch.testing.assert_close(ours[k], theirs[k], equal_nan=True)


# ---------------------------------------------------------------------- 2. checkpoint components
def test_checkpoint_component_filters_keep_their_meaning():
    class Holder(Checkpointable):  # the filters only; nothing to save
        def get_state(self, components=None, *, not_components=None, **kwargs):
            return {}

        def set_state(self, state):
            pass

        def get_ctor_args_and_kwargs(self):
            return (), {}

    h = Holder()
    assert rllib_private.wants_component(h, "rl_module", None, None)
    assert rllib_private.wants_component(h, "rl_module", ["rl_module/default_policy"], None)
    assert rllib_private.wants_component(h, "rl_module", "rl_module", None)
    assert not rllib_private.wants_component(h, "rl_module", ["learner"], None)
    assert not rllib_private.wants_component(h, "rl_module", None, ["rl_module"])
    assert rllib_private.subcomponents(h, "rl_module", ["rl_module/default_policy", "learner"]) == ["default_policy"]
    assert rllib_private.subcomponents(h, "rl_module", None) is None


# ---------------------------------------------------------------------- 3. W&B log cleaning
def test_rays_wandb_logger_still_cleans_its_logs_with_clean_log():
    import ray.air.integrations.wandb as ray_wandb

    assert "_clean_log(" in inspect.getsource(ray_wandb.WandbLoggerCallback) or \
        "_clean_log(" in inspect.getsource(ray_wandb._WandbLoggingActor)
    nested = {"a": {"b": 1.5, "c": [1, 2]}, "d": (3, "x"), "e": np.float32(2.0)}
    cleaned = rllib_private.clean_wandb_log(nested)
    assert cleaned["a"] == {"b": 1.5, "c": [1, 2]} and cleaned["d"] == (3, "x") and cleaned["e"] == 2.0


# ---------------------------------------------------------------------- the rest is public
def test_the_public_hooks_qworld_uses_are_there():
    from ray.rllib.core.learner.learner_group import LearnerGroup
    from ray.rllib.env.env_runner_group import EnvRunnerGroup

    assert "func" in inspect.signature(LearnerGroup.foreach_learner).parameters
    # its definition (Ray's actor machinery may add a tracing keyword to the signature it reports)
    code = Learner.compute_losses.__code__
    assert code.co_varnames[1:code.co_argcount + code.co_kwonlyargcount] == ("fwd_out", "batch")
    # compute_losses is called once per minibatch (one gradient step) by the update loop
    assert "self.compute_losses(" in inspect.getsource(TorchLearner._uncompiled_update)
    assert isinstance(inspect.getattr_static(Learner, "module"), property)
    assert isinstance(inspect.getattr_static(Learner, "device"), property)
    assert {"local_env_runner", "timeout_seconds"} <= set(inspect.signature(EnvRunnerGroup.foreach_env_runner).parameters)


# RLModule's forward hooks RLlib's docs tell a module to implement, and torch's foreach kernels
# (torch's, not Ray's): the only underscore names qworld.agents reaches that it does not define.
DOCUMENTED = {"_forward_train", "_forward_inference", "_forward_exploration", "_foreach_norm", "_foreach_mul_"}


def test_agents_reach_no_other_private_name():
    """Outside rllib_private.py, every ``._name`` qworld.agents reads is one qworld defines."""
    import qworld.agents

    root = Path(qworld.agents.__file__).parent
    sources = {p: p.read_text() for p in sorted(root.rglob("*.py")) if p.name != "rllib_private.py"}
    own = set()
    for text in sources.values():
        own |= set(re.findall(r"def (_[a-z]\w*)", text))
        own |= set(re.findall(r"self\.(_[a-z]\w*)\s*(?::[^=\n]*)?=[^=]", text))
        own |= set(re.findall(r"^\s+(_[a-z]\w*)\s*(?::[^=\n]*)?=[^=]", text, re.M))
    foreign = {}
    for path, text in sources.items():
        for name in set(re.findall(r"\.(_[a-z]\w*)", text)) - own - DOCUMENTED:
            foreign.setdefault(name, []).append(path.name)
    assert not foreign, f"private names outside qworld.agents.rllib_private: {foreign}"
    # and the check sees one
    assert re.findall(r"\.(_[a-z]\w*)", "self.learner_group._learner") == ["_learner"]
