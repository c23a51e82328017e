"""One Tune trainable for a sweep that crosses learner families (``sweep.algorithm``).

Tune runs one trainable class per experiment; :class:`AnyFamily` builds, per trial, the
Algorithm of the family its config names (``config["algorithm"]``) from the config keys
that family knows, and forwards training, checkpoints and resource requests to it. A
checkpoint is exactly the family's own (``save_checkpoint`` of the inner Algorithm), so
``load_q`` reads it like any other. Sweeps of one family use that family's Algorithm
directly (trial dirs ``PQN_*`` / ``GoalDQN_*``), as before.
"""

from __future__ import annotations

from typing import Any, Mapping

from ray import tune

from qworld.agents.families import Family, family_of


def family_config(config: Mapping[str, Any]) -> tuple[Family, dict]:
    """The trial's family and the part of its config that family's config class knows."""
    fam = family_of(config)
    known = set(fam.config_class()().to_dict())
    return fam, {k: v for k, v in config.items() if k in known}


class AnyFamily(tune.Trainable):
    """A Tune trainable that is the Algorithm of the family ``config["algorithm"]`` names."""

    @classmethod
    def default_resource_request(cls, config):
        fam, cfg = family_config(config)
        return fam.algo_class().default_resource_request(cfg)

    def setup(self, config):
        fam, cfg = family_config(config)
        self.family = fam.name
        self.algo = fam.algo_class()(config=cfg)

    def step(self):
        result = self.algo.train()
        for key in ("done", "training_iteration", "iterations_since_restore", "time_since_restore",
                    "time_total_s", "timesteps_total", "episodes_total", "trial_id", "config"):
            result.pop(key, None)  # Tune fills these for the outer trainable
        return result

    def save_checkpoint(self, checkpoint_dir: str):
        self.algo.save_checkpoint(checkpoint_dir)

    def load_checkpoint(self, checkpoint):
        self.algo.load_checkpoint(checkpoint)

    def cleanup(self):
        self.algo.stop()
