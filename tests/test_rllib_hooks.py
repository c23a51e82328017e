"""The one private RLlib hook qworld overrides, pinned: a Ray upgrade that changes it fails here,
not silently in training.

PQN replaces the gradient-clip function of ``Learner.postprocess_gradients_for_module``
(``_get_clip_function``, a private static method) with a fused global-norm clip that gives
RLlib's numbers (``qworld.agents.pqn.learner.clip_gradients_fused``). Everything else goes
through public API: ``LearnerGroup.foreach_learner`` for the live module
(``QworldAlgorithmMixin.live_module``), ``Learner.compute_losses`` for MR.Q's per-step target
sync.
"""

from __future__ import annotations

import inspect

import torch
from ray.rllib.core.learner.learner import Learner
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.torch_utils import clip_gradients

from qworld.agents.pqn.learner import PQNTorchLearner, clip_gradients_fused

torch.set_num_threads(1)


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


def defined_parameters(fn) -> list[str]:
    """The parameter names ``fn``'s code defines. Not ``inspect.signature``: making a class into
    a Ray actor sets ``__signature__`` (with an added ``_ray_trace_ctx``) on the original
    function of every method it inherits, ``Learner.compute_losses`` included, so the signature
    read in a test process depends on which tests ran there before (remote learners)."""
    code = fn.__code__
    return list(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])


def test_the_public_hooks_qworld_uses_are_there():
    from ray.rllib.core.learner.learner_group import LearnerGroup

    assert "func" in inspect.signature(LearnerGroup.foreach_learner).parameters
    assert defined_parameters(Learner.compute_losses)[1:] == ["fwd_out", "batch"]
    # compute_losses is called once per minibatch (one gradient step) by the update loop
    assert "self.compute_losses(" in inspect.getsource(TorchLearner._uncompiled_update)
