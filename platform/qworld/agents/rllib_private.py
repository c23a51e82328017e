"""Every private Ray / RLlib name qworld uses, in this one module.

qworld goes through RLlib's public API everywhere else (``LearnerGroup.foreach_learner`` for
the live module, ``Learner.module`` / ``Learner.device``, ``EnvRunnerGroup.foreach_env_runner``
for sampling, ``AlgorithmConfig``'s public properties for the settings PQN derives). What is
left has no public equivalent; each use is here, and ``tests/test_rllib_hooks.py`` pins each
one, so a Ray upgrade that changes one fails there, not silently in training:

1. ``TorchLearner._get_clip_function`` (a private static method):
   ``Learner.postprocess_gradients_for_module`` clips every gradient through what it returns.
   :class:`FusedClipLearner` returns :func:`clip_gradients_fused`, RLlib's global-norm clip
   (``ray.rllib.utils.torch_utils.clip_gradients``) with the same numbers in two fused
   kernels (PQN's learner);
2. ``Checkpointable._check_component`` / ``_get_subcomponents``: which components a
   ``get_state(components=..., not_components=...)`` call asks for (:func:`wants_component`,
   :func:`subcomponents`; the episode-replay families' and the batched env runner's state);
3. ``ray.air.integrations.wandb._clean_log``: what Ray's W&B logger makes of a config or
   result before logging it (:func:`clean_wandb_log`; the sweep's W&B callback logs as it).

(RLModule's ``_forward_train`` / ``_forward_exploration`` / ``_forward_inference`` are the
hooks RLlib's documentation tells a module to implement, not private uses.)
"""

from __future__ import annotations

from typing import Any, Collection, Dict, Optional, Union

import torch

from ray.rllib.utils.torch_utils import clip_gradients


# ---------------------------------------------------------------------- 1. gradient clipping
def clip_gradients_fused(
    gradients_dict: Dict[Any, torch.Tensor],
    *,
    grad_clip: Optional[float] = None,
    grad_clip_by: str = "value",
) -> Optional[torch.Tensor]:
    """RLlib's ``clip_gradients`` with the global-norm case fused over the tensors.

    The same numbers as ``ray.rllib.utils.torch_utils.clip_gradients`` (a non-finite
    norm read as 1e9, coefficient ``grad_clip / max(norm + 1e-6, grad_clip)``, gradients
    scaled in place, the norm returned) in two foreach kernels instead of three small
    ops per tensor (a third of RLlib's clip time on a CPU step). Other modes: RLlib's.
    """
    if grad_clip is None or grad_clip_by != "global_norm":
        return clip_gradients(gradients_dict, grad_clip=grad_clip, grad_clip_by=grad_clip_by)
    grads = [g.detach() for g in gradients_dict.values() if g is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch.stack(torch._foreach_norm(grads)).nan_to_num(neginf=-10e8, posinf=10e8)
    total = torch.linalg.vector_norm(norms).nan_to_num(neginf=-10e8, posinf=10e8)
    coeff = (grad_clip / torch.clamp(total + 1e-6, min=grad_clip)).clamp(max=1.0)
    torch._foreach_mul_(grads, coeff)
    return total


class FusedClipLearner:
    """Listed before ``TorchLearner``: its gradient clip is :func:`clip_gradients_fused`."""

    @staticmethod
    def _get_clip_function():
        return clip_gradients_fused


# ---------------------------------------------------------------------- 2. checkpoint components
Components = Optional[Union[str, Collection[str]]]


def wants_component(checkpointable: Any, name: str, components: Components, not_components: Components) -> bool:
    """Whether a ``get_state(components, not_components=...)`` call asks for ``name``."""
    return checkpointable._check_component(name, components, not_components)


def subcomponents(checkpointable: Any, name: str, components: Components) -> Components:
    """The part of ``components`` below ``name`` (``"rl_module/default_policy"`` ->
    ``["default_policy"]``), for a sub-component's own ``get_state``."""
    return checkpointable._get_subcomponents(name, components)


# ---------------------------------------------------------------------- 3. W&B logging
def clean_wandb_log(obj: Any) -> Any:
    """What Ray's ``WandbLoggerCallback`` logs of ``obj`` (nested dicts and lists kept, arrays
    of images / videos as W&B media, anything W&B cannot log made loggable)."""
    from ray.air.integrations.wandb import _clean_log

    return _clean_log(obj)
