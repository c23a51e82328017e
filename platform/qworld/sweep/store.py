"""The results store: ``EXPERIMENT_DIR/worldmodels.parquet``.

It is a parquet *dataset directory* (pandas and pyarrow read it as one table) holding one
file per (trial, checkpoint). The file name is the key, and each file is written to a
temporary name and renamed into place, so:

- several P-learning actors can write at once without a lock;
- re-scoring a checkpoint (actor restart, ``qworld extract``, ``qworld resume``) replaces
  its rows instead of duplicating them;
- a crash mid-write leaves no partial file behind.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from qworld import metrics as K

STORE_NAME = "worldmodels.parquet"


def store_path(experiment_dir: str | Path) -> Path:
    return Path(experiment_dir) / STORE_NAME


def _key_file(experiment_dir: str | Path, trial_id: str, checkpoint_index: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(trial_id))
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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, target)  # atomic: readers see the old rows or the new, never half
    return target


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
