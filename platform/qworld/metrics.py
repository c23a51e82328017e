"""Every metric key and results column, in one place.

One name per concept across code, YAML, metric keys, parquet columns and docs
(see DESIGN.md "Naming"). Import the constants instead of spelling strings.
"""

# --- grid cell (the columns that identify a trial) ---------------------------------
SWEEP = "sweep"
TRIAL_ID = "trial_id"
ENV = "env"
VARIANT = "variant"
GOAL_TYPE = "goal_type"
NUM_GOALS = "num_goals"
HEAD = "head"
SEED = "seed"
ALGORITHM = "algorithm"  # learner family: pqn | dqn (qworld.agents.families.ALGORITHMS)
GRID_COLUMNS = (SWEEP, TRIAL_ID, ENV, ALGORITHM, VARIANT, GOAL_TYPE, NUM_GOALS, HEAD, SEED)

# --- where in training ----------------------------------------------------------------
CHECKPOINT_INDEX = "checkpoint_index"
CHECKPOINT_PATH = "checkpoint_path"
# A checkpoint's identity: a uuid4 hex written into its qworld_config.json when it is saved
# (qworld.agents.checkpoint) and copied into every row scored from it. A checkpoint number a
# rolled-back trial wrote again has a new uid, so its older rows are known to be stale.
CHECKPOINT_UID = "checkpoint_uid"
WRITTEN_BY = "written_by"  # qworld_config.json: the Ray node, host and pid that saved a checkpoint
ENV_STEPS = "env_steps"  # env steps sampled so far (all envs together)
METHOD = "method"  # extraction method: from Q (plearn.finite / plearn.continuous METHODS) or an
#   explicit model (qworld.worldmodel.experience.EXPLICIT_METHODS: supervised | qss | forward_model)
# Methods handed the true support of P: yardsticks, not findings; reports label them "(oracle)".
ORACLE_METHODS = ("known_support",)
ORACLE = "oracle"  # bool column: the row's method was handed part of the answer (ORACLE_METHODS)
LOAD_METHOD = "load"  # the method of the one row reporting a checkpoint that could not be read

# --- world-model quality ---------------------------------------------------------------
P_MSE = "p_mse"  # mean over all (s, a, s') of (P_hat - P)^2, as the paper plots
P_TV = "p_tv"  # mean over (s, a) of total variation distance
P_MAX_ERR = "p_max_err"  # max abs error over all entries
Q_NMSE = "q_nmse"  # agent Q vs exact Q of its own greedy policy, MSE / Var(truth)
# finite: states whose P rows are left out of p_mse / p_tv / p_max_err (and rare/, recovered/):
# the MDP's own terminal states (FrozenLake's holes, ...; qworld_envs.tabular), where every
# episode ends, so no Q constrains what P says happens after them. 0 for FourRooms.
P_ROWS_UNSCORED = "p_rows_unscored"
WM_NMSE = "wm_nmse"  # continuous world model: NMSE on s'
WM_DELTA_NMSE = "wm_delta_nmse"  # continuous: NMSE on Delta s = s' - s, one key per dim: f"{WM_DELTA_NMSE}_{dim}"
# continuous stochastic model: recovered / true std of s', one key per noisy dim: f"{NOISE_STD_RATIO}_{dim}"
NOISE_STD_RATIO = "noise_std_ratio"
BASELINE_IDENTITY = "identity"  # prefix f"{BASELINE_IDENTITY}/<metric>": the baseline model s' = s
BASELINE_NO_FORCE = "no_force"  # prefix f"{BASELINE_NO_FORCE}/<metric>": the dynamics with the action's force removed
INTERIOR = "interior"  # prefix f"{INTERIOR}/<metric>": continuous scores on the interior transitions only
FRACTION = "fraction"  # f"{INTERIOR}/{FRACTION}": the share of compared transitions that are interior
# prefix f"{RARE}/<metric>": scores where the agent has almost no experience of its own (finite:
# (s, a) rows with fewer than qworld.worldmodel.experience.RARE_VISITS transitions; continuous: states with
# no experienced state nearby); f"{RARE}/{FRACTION}" their share. Only for trials that recorded
# their experience.
RARE = "rare"
UNVISITED_FRACTION = "unvisited_fraction"  # finite: share of (s, a) never experienced by the checkpoint
# --- does the extracted model explain the agent's Q? (finite; scoring.misspecification) -------
# RMS over goals and scored (s, a) of the Bellman residual Q - M P_hat, over the RMS of Q: the
# share of the agent's Q that the extracted model fails to explain
MODEL_RESIDUAL = "model_residual"
# model_residual over the one the true P leaves with the same Q and M (what the agent's own Q
# error alone leaves; floored at 1e-9 of Q, the round-off of exact Q): about 1 or below when
# the model explains Q as well as the truth does, far above when it does not
RESIDUAL_EXCESS = "residual_excess"
# flag (1.0 / 0.0, stored as float64 like every flag among the scores): residual_excess above
# MISSPECIFIED_EXCESS, the model does not explain the agent's Q (its assumptions do not hold
# here, or the method found no model that does): its p_mse is not a finding about Q
MISSPECIFIED = "misspecified"
MISSPECIFIED_EXCESS = 2.0

# --- identifiability diagnosis of M -----------------------------------------------------
M_RANK = "m_rank"
M_COND = "m_cond"
M_GAP = "m_gap"
IDENTIFIABLE_CASE = "identifiable_case"
IDENTIFIABLE_REASON = "identifiable_reason"  # one line: why that case, or what fails
NUM_STATES = "num_states"  # S, reported next to num_goals by the diagnosis

# --- planning with the extracted model ---------------------------------------------------
TASK = "task"
PLAN_SUCCESS = "plan_success"  # probability the plan reaches the goal (true MDP)
PLAN_EXCESS_STEPS = "plan_excess_steps"  # expected steps minus the optimal plan's
UNSAFE_VISITS = "unsafe_visits"  # probability of ever entering a forbidden state
RETURN_RATIO = "return_ratio"  # R_WM / R*
RETURN_WM = "return_wm"  # continuous unseen goal: mean discounted return of the plan made in the world model
RETURN_STAR = "return_star"  # ... and of the plan made in the true dynamics (R*)
STAR = "star"  # prefix f"{STAR}/<metric>": the same metric for the plan made in the true dynamics
# probability that the agent's own greedy policy reaches its goal within the time limit (true
# MDP / dynamics, mean over goals and starts; continuous: starts from the env's reset
# distribution); finite: f"{STAR}/{POLICY_SUCCESS}" that of the optimal policy (the
# demonstrator of an imitation learner)
POLICY_SUCCESS = "policy_success"
# continuous: mean discounted return of the agent's own greedy policy on its training goals
# (true dynamics, mean over goals and resets from the env's reset distribution): the agent
# return of the paper's architecture study, beside the continuous policy_success
POLICY_RETURN = "policy_return"
PLAN_STEPS = "plan_steps"  # expected steps to the goal, given that it is reached (true MDP)
PLAN_OPTIMAL_STEPS = "plan_optimal_steps"  # the same for the optimal plan in the true MDP
# finite: 1 - (the plan's discounted chance of reaching the goal) / (the optimal plan's), true
# MDP, start states averaged; 0 for an optimal plan (what the planner maximises, unlike
# plan_success, which a slower, more careful plan can raise)
PLAN_REGRET = "plan_regret"

# --- the reward side: goals and rewards from Q (qworld.worldmodel.reward) ---------------------------
# extract.tasks entry and column prefix f"{GOAL_INFERENCE}/<score>": each indicator goal named
# from its own Q and a model it never helped build (finite envs)
GOAL_INFERENCE = "goal_inference"
ACCURACY = "accuracy"  # share of held-out goals whose cell was named right
HELD_OUT = "held_out"  # how many goals were held out (L)
REWARD_PEARSON = "reward_pearson"  # correlation of recovered with true rewards (mean over goals)
REWARD_SPEARMAN = "reward_spearman"
REWARD_NMSE = "reward_nmse"
REWARD_METRICS = (ACCURACY, HELD_OUT, REWARD_PEARSON, REWARD_SPEARMAN, REWARD_NMSE)
# An imitation learner's rows (IQ-Learn, finite envs): f"{DEMONSTRATIONS}/{REWARD_PEARSON}" is the
# correlation of the reward it recovers, r = Q(s, a) - gamma (1 - done) V(s'), with the true one
# over its demonstration transitions (IQ-Learn's own measure); f"{RECOVERED}/<score>" scores the
# world model the row's method extracts with those recovered rewards in M instead of the true ones.
DEMONSTRATIONS = "demonstrations"
RECOVERED = "recovered"

# --- bookkeeping -------------------------------------------------------------------------
FIT_SECONDS = "fit_seconds"
ERROR = "error"

# --- the scores of a results row, in one list ---------------------------------------------
# A row's score columns are these keys, f"{WM_DELTA_NMSE}_<dim>", f"{NOISE_STD_RATIO}_<dim>", and either under prefixes
# (f"<task>/<metric>", f"{INTERIOR}/...", f"{BASELINE_IDENTITY}/...", f"{STAR}/..."). W&B logs
# every one of them (sweep.callbacks); is_row_metric says whether a column is one.
WORLD_MODEL_METRICS = (P_MSE, P_TV, P_MAX_ERR, Q_NMSE, WM_NMSE, MODEL_RESIDUAL, RESIDUAL_EXCESS, MISSPECIFIED)
# Planning metrics appear as "<task>/<metric>" columns, one group per planning task.
PLAN_METRICS = (PLAN_SUCCESS, POLICY_SUCCESS, POLICY_RETURN, PLAN_EXCESS_STEPS, PLAN_REGRET, UNSAFE_VISITS, RETURN_RATIO,
                PLAN_STEPS, PLAN_OPTIMAL_STEPS,
                RETURN_WM, RETURN_STAR)
ROW_METRICS = (*WORLD_MODEL_METRICS, P_ROWS_UNSCORED, M_RANK, M_COND, M_GAP, FIT_SECONDS, FRACTION, UNVISITED_FRACTION,
               *PLAN_METRICS, *REWARD_METRICS)


def is_row_metric(column: str) -> bool:
    """Whether a results-row column is a score (see ``ROW_METRICS``)."""
    last = str(column).rsplit("/", 1)[-1]
    return last in ROW_METRICS or last.startswith((WM_DELTA_NMSE + "_", NOISE_STD_RATIO + "_"))


# --- the results dataset's schema (worldmodels.parquet/): one declared type per column -------
# Every fragment is written with these columns first, in this order and with these types
# (null where a row has none: an error row, a family or env without that score), so any
# reader of the directory (pandas, pyarrow.dataset, DuckDB, polars) agrees on every type.
RESULT_COLUMNS: dict[str, str] = {
    SWEEP: "string", TRIAL_ID: "string", ENV: "string", ALGORITHM: "string", VARIANT: "string",
    GOAL_TYPE: "string", NUM_GOALS: "int64", HEAD: "string", SEED: "int64",
    CHECKPOINT_INDEX: "int64", CHECKPOINT_UID: "string", CHECKPOINT_PATH: "string", ENV_STEPS: "int64",
    METHOD: "string", ORACLE: "bool", ERROR: "string",
    Q_NMSE: "float64", P_MSE: "float64", P_TV: "float64", P_MAX_ERR: "float64", WM_NMSE: "float64",
    M_RANK: "int64", M_COND: "float64", M_GAP: "float64", IDENTIFIABLE_CASE: "string",
    IDENTIFIABLE_REASON: "string", FIT_SECONDS: "float64",
}
# Every other column (``<task>/<metric>``, ``rare/...``, ``wm_delta_nmse_<dim>``, ...) follows
# these, sorted by name, typed by its last ``/`` part: text for these names, float64 otherwise
# (counts and flags among the scores are stored as float64 too).
RESULT_TEXT_SUFFIXES = (TASK, IDENTIFIABLE_CASE, IDENTIFIABLE_REASON, ERROR, METHOD)
RESULT_INT_COLUMNS = (NUM_STATES,)  # declared, not always present


def result_column_type(column: str) -> str:
    """The declared type of a results column: ``string``, ``int64``, ``bool`` or ``float64``."""
    if column in RESULT_COLUMNS:
        return RESULT_COLUMNS[column]
    if column in RESULT_INT_COLUMNS:
        return "int64"
    return "string" if str(column).rsplit("/", 1)[-1] in RESULT_TEXT_SUFFIXES else "float64"


def result_column_order(columns) -> list[str]:
    """The declared columns first (all of them, in declared order), then the others sorted."""
    extra = sorted({str(c) for c in columns} - set(RESULT_COLUMNS))
    return [*RESULT_COLUMNS, *extra]


def results_schema(columns=()):
    """The ``pyarrow.Schema`` of a results fragment holding ``columns`` (plus every declared
    one): the one place the dataset's types are decided."""
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "bool": pa.bool_(), "float64": pa.float64()}
    return pa.schema([pa.field(c, types[result_column_type(c)], nullable=True)
                      for c in result_column_order(columns)])


# --- training metrics reported by the PQN algorithm (prefix groups as in CleanRL) -------
TRAIN_ENV_STEPS = "num_env_steps_sampled_lifetime"
TRAIN_LOSS = "learner/td_loss"
TRAIN_Q_MEAN = "learner/q_mean"
TRAIN_EPSILON = "learner/epsilon"
TRAIN_EPISODE_RETURN = "env_runners/episode_return_mean"
TRAIN_EPISODE_SUCCESS = "env_runners/episode_success_mean"
TRAIN_LR = "learner/lr"
TRAIN_EPISODE_LENGTH = "env_runners/episode_len_mean"
TRAIN_NONFINITE_STEPS_SKIPPED = "learner/nonfinite_steps_skipped"  # gradient steps skipped this iteration
TRAIN_NONFINITE_STEPS_SKIPPED_LIFETIME = "learner/nonfinite_steps_skipped_lifetime"
TRAIN_REPLAY_SIZE = "replay/size"  # transitions in the replay buffer (MR.Q, D3G), after the iteration's rollouts
