"""The results store: ``EXPERIMENT_DIR/worldmodels.parquet`` and the models ``worldmodels_p/``.

It is a parquet *dataset directory* (pandas and pyarrow read it as one table) holding one
file per (trial, checkpoint). The file name is the key, and each file is written to a
temporary name and renamed into place, so:

- several P-learning actors can write at once without a lock;
- re-scoring a checkpoint (actor restart, ``qworld extract``, ``qworld resume``) replaces
  its rows instead of duplicating them;
- a crash mid-write leaves no partial file behind.

The extracted ``P_hat`` of finite envs go next to it, one ``.npz`` per (trial, checkpoint)
under the same key (:func:`write_world_models`)::

    EXPERIMENT_DIR/worldmodels.parquet/trial=<id>-ckpt=000007.parquet   the rows
    EXPERIMENT_DIR/worldmodels_p/trial=<id>-ckpt=000007.npz             method -> P_hat[S, A, S]
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from qworld import metrics as K
from qworld.layout import STORE_DIR, WORLD_MODELS_DIR


def store_path(experiment_dir: str | Path) -> Path:
    return Path(experiment_dir) / STORE_DIR


def _safe_id(trial_id: str) -> str:
    """The trial id as it appears in file names (Tune's ids, ``a1b2c_00003``, are unchanged)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(trial_id))


def _key_file(experiment_dir: str | Path, trial_id: str, checkpoint_index: int) -> Path:
    safe = _safe_id(trial_id)
    return store_path(experiment_dir) / f"trial={safe}-ckpt={int(checkpoint_index):06d}.parquet"


def write_rows(experiment_dir: str | Path, rows: Iterable[Mapping]) -> Path:
    """Write the rows of ONE (trial, checkpoint), replacing any earlier rows for that key."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        raise ValueError("write_rows: no rows to write")
    keys = frame[[K.TRIAL_ID, K.CHECKPOINT_INDEX]].drop_duplicates()
    if len(keys) != 1:
        raise ValueError(f"write_rows: rows of exactly one (trial, checkpoint) expected, got {len(keys)}")
    if frame[K.METHOD].duplicated().any():
        raise ValueError("write_rows: one row per method expected")
    trial_id, index = keys.iloc[0]
    target = _key_file(experiment_dir, trial_id, index)
    _write_atomic(target, lambda fh: frame.to_parquet(fh, index=False))
    return target


def _write_atomic(target: Path, write) -> None:
    """``write(file object)`` to a temporary name, then rename it into place: readers see
    the old file or the new one, never half, and a crash mid-write leaves no partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, target)


def read_rows(experiment_dir: str | Path, trial_id: str, checkpoint_index: int) -> pd.DataFrame | None:
    """The stored rows of one (trial, checkpoint), or None when it is not scored (yet)."""
    path = _key_file(experiment_dir, trial_id, checkpoint_index)
    return pd.read_parquet(path) if path.is_file() else None


def scored_keys(experiment_dir: str | Path) -> set[tuple[str, int]]:
    """The (trial_id, checkpoint_index) pairs already in the store."""
    root = store_path(experiment_dir)
    if not root.is_dir():
        return set()
    keys = set()
    for path in root.glob("trial=*-ckpt=*.parquet"):
        frame = pd.read_parquet(path, columns=[K.TRIAL_ID, K.CHECKPOINT_INDEX])
        keys.update((str(t), int(c)) for t, c in frame.drop_duplicates().itertuples(index=False))
    return keys


def read_store(experiment_dir: str | Path) -> pd.DataFrame:
    """Every scored row, one per (trial, checkpoint, method); empty frame if none."""
    root = store_path(experiment_dir)
    files = sorted(root.glob("trial=*-ckpt=*.parquet")) if root.is_dir() else []
    if not files:
        return pd.DataFrame(columns=[*K.GRID_COLUMNS, K.CHECKPOINT_INDEX, K.METHOD])
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    return frame.sort_values([K.TRIAL_ID, K.CHECKPOINT_INDEX, K.METHOD], ignore_index=True)


# --------------------------------------------------------------------------------------
# extracted world models: EXPERIMENT_DIR/worldmodels_p/trial=<id>-ckpt=<000007>.npz

WORLD_MODEL_DTYPE = np.float32


def world_models_path(experiment_dir: str | Path) -> Path:
    return Path(experiment_dir) / WORLD_MODELS_DIR


def _model_file(experiment_dir: str | Path, trial_id: str, checkpoint_index: int) -> Path:
    # the same key as the rows' parquet file, so a model file names its rows
    name = _key_file(experiment_dir, trial_id, checkpoint_index).with_suffix(".npz").name
    return world_models_path(experiment_dir) / name


def write_world_models(experiment_dir: str | Path, trial_id: str, checkpoint_index: int,
                       models: Mapping[str, Any]) -> Path | None:
    """Store the P_hat of every method of ONE (trial, checkpoint), replacing earlier ones.

    One ``.npz`` (``np.savez_compressed``) per (trial, checkpoint), one ``[S, A, S]`` array
    per method, stored as float32: rows are probability vectors, so float32's 6e-8 relative
    rounding is far below any error worth reading (the loader renormalises the rows). Cost
    on FourRooms (S = 68, A = 4; 74 KB raw per method), measured: ~1 KB for an exactly
    sparse model (column_match, known_support), 8-15 KB for a simplex-projected one (pinv),
    ~63 KB for a softmax one with no exact zero (sgd): about 100 KB per checkpoint with
    five methods (float64 would double the dense ones).

    Args:
        models: method -> extracted model, as ``score_q``'s ``world_models`` fills it;
            only the finite ``P_hat[S, A, S]`` arrays are stored (continuous models, torch
            networks, are not kept yet). None to store (a continuous env, an unreadable
            checkpoint, every method failed): nothing is written and an earlier file of
            this key is removed, so the store never holds models the rows do not.

    Returns:
        The file written, or None when ``models`` is empty.
    """
    target = _model_file(experiment_dir, trial_id, checkpoint_index)
    models = {method: P_hat for method, P_hat in models.items() if isinstance(P_hat, np.ndarray)}
    if not models:
        target.unlink(missing_ok=True)
        return None
    arrays = {}
    for method, P_hat in models.items():
        P_hat = np.asarray(P_hat)
        if P_hat.ndim != 3 or P_hat.shape[0] != P_hat.shape[2]:
            raise ValueError(f"write_world_models: {method!r} must be P_hat[S, A, S], got {P_hat.shape}")
        arrays[str(method)] = P_hat.astype(WORLD_MODEL_DTYPE)
    # a file object: savez would append ".npz" to a temporary name
    _write_atomic(target, lambda fh: np.savez_compressed(fh, **arrays))
    return target


def world_model_keys(experiment_dir: str | Path) -> set[tuple[str, int]]:
    """The (trial_id, checkpoint_index) pairs with stored models (ids as in file names)."""
    root = world_models_path(experiment_dir)
    keys = set()
    for path in root.glob("trial=*-ckpt=*.npz") if root.is_dir() else []:
        match = re.fullmatch(r"trial=(.*)-ckpt=(\d+)\.npz", path.name)
        if match:
            keys.add((match.group(1), int(match.group(2))))
    return keys


def read_world_models(experiment_dir: str | Path, trial_id: str,
                      checkpoint_index: int) -> dict[str, np.ndarray]:
    """method -> ``P_hat[S, A, S]`` as stored (float32) for one (trial, checkpoint).

    Raises:
        FileNotFoundError: no models for that key; the message lists what is stored.
    """
    path = _model_file(experiment_dir, trial_id, checkpoint_index)
    if not path.is_file():
        keys = world_model_keys(experiment_dir)
        if not keys:
            there = (f"no world models are stored in {world_models_path(experiment_dir)} "
                     "(an experiment scored before P_hat was stored, or a continuous env)")
        else:
            mine = sorted(c for t, c in keys if t == _safe_id(trial_id))
            there = (f"stored checkpoints of this trial: {mine}" if mine else
                     f"stored trials: {sorted({t for t, _ in keys})}")
        raise FileNotFoundError(
            f"no world models for trial {trial_id!r}, checkpoint {int(checkpoint_index)}; {there}")
    with np.load(path) as data:
        return {name: data[name] for name in data.files}
