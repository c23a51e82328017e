"""The results store: ``EXPERIMENT_DIR/worldmodels.parquet`` and the models ``worldmodels_p/``.

It is a parquet *dataset directory* (pandas and pyarrow read it as one table) holding one
file per (trial, checkpoint). The file name is the key, and each file is written to a
temporary name and renamed into place, so:

- several P-learning actors can write at once without a lock;
- re-scoring a checkpoint (actor restart, ``qworld extract``, ``qworld resume``) replaces
  its rows instead of duplicating them;
- a crash mid-write leaves no partial file behind (the bytes are flushed to disk before
  the rename, and a failed write removes its temporary file).

A file damaged anyway (a disk filled up or a copy cut short outside qworld) costs one
checkpoint, not the experiment: every reader goes fragment by fragment, names the damaged
file on stderr and moves it to ``worldmodels.parquet.damaged/`` (kept, never deleted), so its
key counts as unscored and ``qworld resume`` / ``qworld extract`` score it again.

Each scoring also leaves an attempt record, ``scoring_attempts/<key>-<attempt>.jsonl``
(:func:`begin_attempt`, :func:`end_attempt`, :func:`read_attempts`): a line when it starts
(trial, checkpoint, pid, time) and one when its rows have landed; the rows' file names its
attempt in its parquet metadata (:func:`fragment_attempt`). Rows are replaced in place, so
only these records show whether a checkpoint was scored twice.

The extracted ``P_hat`` of finite envs go next to it, one ``.npz`` per (trial, checkpoint)
under the same key (:func:`write_world_models`)::

    EXPERIMENT_DIR/worldmodels.parquet/trial=<id>-ckpt=000007.parquet   the rows
    EXPERIMENT_DIR/worldmodels_p/trial=<id>-ckpt=000007.npz             method -> P_hat[S, A, S]
    EXPERIMENT_DIR/scoring_attempts/trial=<id>-ckpt=000007-<attempt>.jsonl   one per attempt
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from qworld import metrics as K
from qworld.layout import SCORING_ATTEMPTS_DIR, STORE_DAMAGED_DIR, STORE_DIR, WORLD_MODELS_DIR


def store_path(experiment_dir: str | Path) -> Path:
    return Path(experiment_dir) / STORE_DIR


def _safe_id(trial_id: str) -> str:
    """The trial id as it appears in file names (Tune's ids, ``a1b2c_00003``, are unchanged)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(trial_id))


def _key_file(experiment_dir: str | Path, trial_id: str, checkpoint_index: int) -> Path:
    safe = _safe_id(trial_id)
    return store_path(experiment_dir) / f"trial={safe}-ckpt={int(checkpoint_index):06d}.parquet"


ATTEMPT_METADATA_KEY = b"qworld_attempt"  # parquet schema metadata: the attempt that wrote a file
_FRAGMENT_GLOB = "trial=*-ckpt=*.parquet"


def write_rows(experiment_dir: str | Path, rows: Iterable[Mapping], attempt: str | None = None) -> Path:
    """Write the rows of ONE (trial, checkpoint), replacing any earlier rows for that key.

    ``attempt`` (an id from :func:`begin_attempt`) is kept in the file's parquet metadata.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if attempt is not None:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), ATTEMPT_METADATA_KEY: str(attempt).encode()})
    _write_atomic(target, lambda fh: pq.write_table(table, fh))
    return target


def _write_atomic(target: Path, write) -> None:
    """``write(file object)`` to a temporary name, flush it to disk, then rename it into
    place: readers see the old file or the new one, never half, and a crash or a full disk
    mid-write leaves no partial file (the temporary one is removed on an error)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------
# reading, fragment by fragment: a damaged file is named, set aside, and counts as unscored


def damaged_path(experiment_dir: str | Path) -> Path:
    """Where damaged result files are kept: ``EXPERIMENT_DIR/worldmodels.parquet.damaged/``."""
    return Path(experiment_dir) / STORE_DAMAGED_DIR


def damaged_files(experiment_dir: str | Path) -> list[Path]:
    """The result files set aside as damaged, oldest name first."""
    root = damaged_path(experiment_dir)
    return sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []


def _key_of_name(name: str) -> tuple[str, int] | None:
    match = re.fullmatch(r"trial=(.*)-ckpt=(\d+)\.parquet", name)
    return (match.group(1), int(match.group(2))) if match else None


def _read_fragment(path: Path) -> pd.DataFrame | None:
    """The rows of one result file; None when it is gone (set aside by another reader) or
    damaged: then it is named on stderr and moved to ``worldmodels.parquet.damaged/``."""
    try:
        before = path.stat()
        frame = pd.read_parquet(path)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        _set_aside(path, before, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None
    problem = _fragment_problem(path, frame)
    if problem:
        _set_aside(path, before, problem)
        return None
    return frame


def _fragment_problem(path: Path, frame: pd.DataFrame) -> str | None:
    """Why a readable file is still not the rows its name promises (None when it is)."""
    missing = [c for c in (K.TRIAL_ID, K.CHECKPOINT_INDEX, K.METHOD) if c not in frame.columns]
    if missing:
        return f"no {missing} column"
    if frame.empty:
        return "no rows"
    key = _key_of_name(path.name)
    keys = {(_safe_id(t), int(c)) for t, c in frame[[K.TRIAL_ID, K.CHECKPOINT_INDEX]].drop_duplicates()
            .itertuples(index=False)}
    if key is None or keys != {key}:
        return f"rows of {sorted(keys)} under the name of {key}"
    return None


def _set_aside(path: Path, seen: os.stat_result, reason: str) -> Path | None:
    """Move a damaged result file to the damaged dir (never delete it), say so on stderr.

    A scorer may have replaced the file with good rows since it was read (a rename: a new
    inode); such a file is put back, not kept aside."""
    dest_dir = damaged_path(path.parent.parent)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / path.name
    if dest.exists():  # damaged before: keep both
        dest = dest_dir / f"{path.stem}.{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}{path.suffix}"
    try:
        os.rename(path, dest)
    except FileNotFoundError:  # another reader set it aside first
        return None
    moved = dest.stat()
    if (moved.st_ino, moved.st_dev) != (seen.st_ino, seen.st_dev):
        # not the file we read: a fresh write landed in between; put it back unless an
        # even newer one is there (then this one is stale but whole: keep it aside too)
        if not path.exists():
            os.rename(dest, path)
            return None
    print(f"qworld: warning: damaged results file {path} ({reason}); moved to {dest}. "
          "Its checkpoint counts as unscored: `qworld resume` or `qworld extract` scores it again.",
          file=sys.stderr, flush=True)
    return dest


def _fragments(experiment_dir: str | Path) -> list[Path]:
    root = store_path(experiment_dir)
    return sorted(root.glob(_FRAGMENT_GLOB)) if root.is_dir() else []


def read_rows(experiment_dir: str | Path, trial_id: str, checkpoint_index: int) -> pd.DataFrame | None:
    """The stored rows of one (trial, checkpoint), or None when it is not scored (yet) or
    its file is damaged (then set aside)."""
    path = _key_file(experiment_dir, trial_id, checkpoint_index)
    return _read_fragment(path) if path.is_file() else None


def is_scored(experiment_dir: str | Path, trial_id: str, checkpoint_index: int) -> bool:
    """Whether one (trial, checkpoint) has readable rows (reads that one file only)."""
    return read_rows(experiment_dir, trial_id, checkpoint_index) is not None


def fragment_attempt(experiment_dir: str | Path, trial_id: str, checkpoint_index: int) -> str | None:
    """The attempt id (:func:`begin_attempt`) that wrote the stored rows of a key, if any."""
    import pyarrow.parquet as pq

    path = _key_file(experiment_dir, trial_id, checkpoint_index)
    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - missing or damaged: no attempt to name
        return None
    value = metadata.get(ATTEMPT_METADATA_KEY)
    return value.decode() if value is not None else None


def scored_keys(experiment_dir: str | Path) -> set[tuple[str, int]]:
    """The (trial_id, checkpoint_index) pairs with readable rows in the store (a damaged
    file is set aside and its key left out, so it is scored again)."""
    keys = set()
    for path in _fragments(experiment_dir):
        frame = _read_fragment(path)
        if frame is not None:
            keys.update((str(t), int(c)) for t, c in
                        frame[[K.TRIAL_ID, K.CHECKPOINT_INDEX]].drop_duplicates().itertuples(index=False))
    return keys


def read_store(experiment_dir: str | Path) -> pd.DataFrame:
    """Every scored row, one per (trial, checkpoint, method); empty frame if none. A damaged
    file is named on stderr and set aside; every other row is returned."""
    frames = [f for f in map(_read_fragment, _fragments(experiment_dir)) if f is not None]
    if not frames:
        return pd.DataFrame(columns=[*K.GRID_COLUMNS, K.CHECKPOINT_INDEX, K.METHOD])
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values([K.TRIAL_ID, K.CHECKPOINT_INDEX, K.METHOD], ignore_index=True)


# --------------------------------------------------------------------------------------
# scoring attempts: EXPERIMENT_DIR/scoring_attempts/trial=<id>-ckpt=000007-<attempt>.jsonl

ATTEMPT_STARTED = "started"
ATTEMPT_FINISHED = "finished"


def attempts_path(experiment_dir: str | Path) -> Path:
    return Path(experiment_dir) / SCORING_ATTEMPTS_DIR


def _append_line(path: Path, record: Mapping, create: bool = False) -> None:
    """One JSON line in one ``write`` (O_APPEND): records are only ever added."""
    flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def begin_attempt(experiment_dir: str | Path, trial_id: str, checkpoint_index: int,
                  checkpoint_path: str | None = None, force: bool = False) -> str:
    """Record that this process starts scoring one (trial, checkpoint); returns the attempt id
    (pass it to :func:`write_rows` and :func:`end_attempt`)."""
    attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    root = attempts_path(experiment_dir)
    root.mkdir(parents=True, exist_ok=True)
    stem = _key_file(experiment_dir, trial_id, checkpoint_index).stem
    record = {"event": ATTEMPT_STARTED, "attempt": attempt, K.TRIAL_ID: str(trial_id),
              K.CHECKPOINT_INDEX: int(checkpoint_index), "pid": os.getpid(),
              "host": socket.gethostname(), "time": time.time(), "force": bool(force),
              K.CHECKPOINT_PATH: None if checkpoint_path is None else str(checkpoint_path)}
    _append_line(root / f"{stem}-{attempt}.jsonl", record, create=True)
    return attempt


def end_attempt(experiment_dir: str | Path, trial_id: str, checkpoint_index: int, attempt: str,
                num_rows: int) -> None:
    """Record that an attempt's rows have landed in the store."""
    stem = _key_file(experiment_dir, trial_id, checkpoint_index).stem
    _append_line(attempts_path(experiment_dir) / f"{stem}-{attempt}.jsonl",
                 {"event": ATTEMPT_FINISHED, "attempt": attempt, "time": time.time(),
                  "rows": int(num_rows)})


ATTEMPT_COLUMNS = ("attempt", K.TRIAL_ID, K.CHECKPOINT_INDEX, "pid", "host", "force",
                   "started", "finished", "rows")


def read_attempts(experiment_dir: str | Path) -> pd.DataFrame:
    """One row per scoring attempt: ``attempt, trial_id, checkpoint_index, pid, host, force,
    started, finished`` (NaN: it never finished, e.g. its process was killed) and ``rows``.
    A line cut short by a kill is skipped."""
    out = []
    root = attempts_path(experiment_dir)
    for path in sorted(root.glob("*.jsonl")) if root.is_dir() else []:
        record: dict[str, Any] = {}
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == ATTEMPT_STARTED:
                record.update({k: event.get(k) for k in ATTEMPT_COLUMNS if k in event},
                              started=event.get("time"))
            elif event.get("event") == ATTEMPT_FINISHED:
                record.update(attempt=event.get("attempt"), finished=event.get("time"),
                              rows=event.get("rows"))
        if K.TRIAL_ID in record:
            out.append(record)
    frame = pd.DataFrame(out, columns=list(ATTEMPT_COLUMNS))
    return frame.sort_values(["started", "attempt"], ignore_index=True)


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
