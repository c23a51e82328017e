"""Names of the files and folders qworld writes, each spelled once.

An experiment dir (``qworld sweep`` -> ``results/<name>``)::

    EXPERIMENT_DIR/
      sweep.yaml               SPEC_FILE: the validated sweep file, kept for resume
      qworld_run.json          RUN_FILE: this experiment's run id (W&B run ids are built on it)
      worldmodels.parquet/     STORE_DIR: the scored rows (``qworld.sweep.store``)
      worldmodels.parquet.damaged/  STORE_DAMAGED_DIR: unreadable result files, set aside (never deleted)
      worldmodels_p/           WORLD_MODELS_DIR: the extracted P_hat per (trial, checkpoint)
      scoring_attempts/        SCORING_ATTEMPTS_DIR: one small JSON-lines file per scoring attempt
      PQN_<trial>/             Tune trial dirs: params.json, result.json, checkpoint_00000k/
                               (named after the trainable: TRIAL_DIR_FAMILIES)

A checkpoint dir::

    checkpoint_00000k/
      qworld_config.json       CHECKPOINT_CONFIG_FILE: the agent's resolved config (and env_steps)
      experience.npz           EXPERIENCE_FILE: the transitions experienced so far (``qworld.worldmodel.experience``)
      learner_group/learner/rl_module/default_policy/   MODULE_SUBDIR: the RLModule
"""

SPEC_FILE = "sweep.yaml"
RUN_FILE = "qworld_run.json"  # the experiment's run id (W&B run ids are built on it)
STORE_DIR = "worldmodels.parquet"
STORE_DAMAGED_DIR = "worldmodels.parquet.damaged"
WORLD_MODELS_DIR = "worldmodels_p"
SCORING_ATTEMPTS_DIR = "scoring_attempts"
CHECKPOINT_CONFIG_FILE = "qworld_config.json"
EXPERIENCE_FILE = "experience.npz"
MODULE_SUBDIR = ("learner_group", "learner", "rl_module", "default_policy")

# Tune names a trial dir after its trainable (``<Algorithm class>_<env>_<trial id>_...``); a
# single-family sweep's params.json is that Algorithm's config, without ``algorithm``, so the
# family is read off the name (crossed sweeps run ``AnyFamily`` and carry the key).
# Algorithm class -> family (``qworld.agents.families.ALGORITHMS``; a test keeps them equal).
TRIAL_DIR_FAMILIES = {"PQN": "pqn", "GoalDQN": "dqn", "MRQ": "mrq", "D3G": "d3g", "IQLearn": "iqlearn"}


def family_of_trial_dir(name: str) -> str | None:
    """The family of a trial dir's name (``D3G_qworld_...`` -> ``d3g``); None for another trainable."""
    prefix = name.split("_", 1)[0]
    return TRIAL_DIR_FAMILIES.get(prefix)

# qworld_config.json keys of a soft, offline learner (IQ-Learn): the temperature T of the soft V
# its Q satisfies (``V = T logsumexp(Q / T)``; absent: greedy V), and its demonstrations' directory
VALUE_TEMPERATURE = "value_temperature"
DEMONSTRATIONS_DIR = "demonstrations_dir"
