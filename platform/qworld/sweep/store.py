"""The results store: ``EXPERIMENT/worldmodels.parquet`` and the models ``worldmodels_p/``.

``EXPERIMENT`` is a local path or a URI (``s3://bucket/results/demo``): every read and write
goes through :mod:`qworld.sweep.location` (``pyarrow.fs``). It is a parquet *dataset
directory* (pandas, pyarrow.dataset, DuckDB and polars read it as one table) holding one file
per (trial, checkpoint), written with the one declared schema of the results
(``qworld.metrics.results_schema``: the declared columns first, in order, then the others
sorted, each with its declared type). The file name is the key, and each file is written
whole (local disk: a temporary file flushed and renamed into place; an object store: one
PUT to the final key), so:

- several P-learning actors can write at once without a lock;
- re-scoring a checkpoint (actor restart, ``qworld extract``, ``qworld resume``) replaces
  its rows instead of duplicating them;
- a crash mid-write leaves no partial file behind.

At the end of a sweep, resume or extract, :func:`conform_schema` rewrites the few fragments
that lack a column another fragment has (an error row, a dense-goal cell without
``policy_success``), so every fragment of a finished experiment has exactly the same schema.

A file damaged anyway (a disk filled up or a copy cut short outside qworld) costs one
checkpoint, not the experiment. Damage is proven, not guessed: a file counts as damaged only
when its bytes were read and do not parse, or parse to rows of another key. Every reader goes
fragment by fragment and names a damaged file on stderr; only the scoring side (``qworld
resume`` / ``extract``, the end of a sweep, a P-learning actor about to score that key:
``set_aside=True``) moves it to ``worldmodels.parquet.damaged/`` (kept, never deleted), and
its key is scored again. ``qworld status``, ``report`` and ``qworld_analysis.load`` move
nothing. A file that cannot be *read* (permission, network, credentials, a missing bucket) is
not damage: :class:`StoreReadError` names it and nothing is moved.

Each checkpoint's rows carry its ``checkpoint_uid`` (written into ``qworld_config.json`` when
it was saved): a checkpoint number that a rolled-back trial wrote again has a new uid, and
its stored rows count as stale (:func:`scored_uids`, :func:`is_scored`).

Each scoring also leaves an attempt record under ``scoring_attempts/`` (:func:`begin_attempt`,
:func:`end_attempt`, :func:`read_attempts`): one small object when it starts (trial,
checkpoint, pid, time) and one when its rows have landed (no appends: object stores have
none); the rows' file names its attempt in its parquet metadata (:func:`fragment_attempt`).
Rows are replaced in place, so only these records show whether a checkpoint was scored twice.

The extracted ``P_hat`` of finite envs go next to it, one ``.npz`` per (trial, checkpoint)
under the same key (:func:`write_world_models`)::

    EXPERIMENT/worldmodels.parquet/trial=<id>-ckpt=000007.parquet   the rows
    EXPERIMENT/worldmodels_p/trial=<id>-ckpt=000007.npz             method -> P_hat[S, A, S]
    EXPERIMENT/scoring_attempts/trial=<id>-ckpt=000007-<attempt>-begin.json  (and -end.json)

Paths handed back (:func:`write_rows`, :func:`damaged_files`, ...) are ``pathlib.Path`` on
local disk and :class:`~qworld.sweep.location.Location` elsewhere; every function accepts
either, or a URI string.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from qworld import metrics as K
from qworld.layout import SCORING_ATTEMPTS_DIR, STORE_DAMAGED_DIR, STORE_DIR, WORLD_MODELS_DIR
from qworld.sweep.location import Location

Where = "str | os.PathLike | Location"


class StoreReadError(OSError):
    """A results file exists but could not be read (permission, network, credentials, a
    missing bucket): not damage, so nothing is moved. The message names the file."""


def _loc(where) -> Location:
    return Location.of(where)


def _public(loc: Location):
    """What a function hands back: a ``Path`` on local disk, the ``Location`` elsewhere."""
    return loc.local_path if loc.is_local else loc


def store_path(experiment_dir: Where):
    return _public(_loc(experiment_dir) / STORE_DIR)


def _safe_id(trial_id: str) -> str:
    """The trial id as it appears in file names (Tune's ids, ``a1b2c_00003``, are unchanged)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(trial_id))


def _key_stem(trial_id: str, checkpoint_index: int) -> str:
    return f"trial={_safe_id(trial_id)}-ckpt={int(checkpoint_index):06d}"


def _key_loc(experiment_dir: Where, trial_id: str, checkpoint_index: int) -> Location:
    return _loc(experiment_dir) / STORE_DIR / f"{_key_stem(trial_id, checkpoint_index)}.parquet"


def _key_file(experiment_dir: Where, trial_id: str, checkpoint_index: int):
    return _public(_key_loc(experiment_dir, trial_id, checkpoint_index))


ATTEMPT_METADATA_KEY = b"qworld_attempt"  # parquet schema metadata: the attempt that wrote a file
_FRAGMENT_GLOB = "trial=*-ckpt=*.parquet"


# --------------------------------------------------------------------------------------
# writing rows with the declared schema


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _convert(column: str, kind: str, value: Any) -> Any:
    if _missing(value):
        return None
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if kind == "string":
        return str(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, (int, float, bool, np.number, np.bool_)):
        raise ValueError(f"results column {column!r} is declared {kind} (qworld.metrics.result_column_type) "
                         f"but got {value!r}; declare the column's type in qworld.metrics")
    if kind == "bool":
        return bool(value)
    if kind == "int64":
        number = float(value)
        if not number.is_integer():
            raise ValueError(f"results column {column!r} is declared int64 but got {value!r}")
        return int(number)
    return float(value)


def results_table(rows: Iterable[Mapping], attempt: str | None = None):
    """``pyarrow.Table`` of result rows with the declared schema (``K.results_schema``): every
    declared column (null where a row has none), then the row's other columns sorted."""
    import pyarrow as pa

    rows = [dict(r) for r in rows]
    schema = K.results_schema(set().union(*(r.keys() for r in rows)) if rows else ())
    arrays = []
    for field in schema:
        kind = K.result_column_type(field.name)
        arrays.append(pa.array([_convert(field.name, kind, r.get(field.name)) for r in rows], type=field.type))
    table = pa.Table.from_arrays(arrays, schema=schema)
    if attempt is not None:
        table = table.replace_schema_metadata({ATTEMPT_METADATA_KEY: str(attempt).encode()})
    return table


def write_rows(experiment_dir: Where, rows: Iterable[Mapping], attempt: str | None = None):
    """Write the rows of ONE (trial, checkpoint), replacing any earlier rows for that key.

    ``attempt`` (an id from :func:`begin_attempt`) is kept in the file's parquet metadata.
    Returns the file written.
    """
    import pyarrow.parquet as pq

    rows = [dict(r) for r in (rows.to_dict("records") if isinstance(rows, pd.DataFrame) else rows)]
    if not rows:
        raise ValueError("write_rows: no rows to write")
    keys = {(str(r.get(K.TRIAL_ID)), r.get(K.CHECKPOINT_INDEX)) for r in rows}
    if len(keys) != 1:
        raise ValueError(f"write_rows: rows of exactly one (trial, checkpoint) expected, got {len(keys)}")
    methods = [r.get(K.METHOD) for r in rows]
    if len(set(methods)) != len(methods):
        raise ValueError("write_rows: one row per method expected")
    trial_id, index = next(iter(keys))
    target = _key_loc(experiment_dir, trial_id, int(index))
    table = results_table(rows, attempt)
    _write_atomic(target, lambda fh: pq.write_table(table, fh))
    return _public(target)


def _write_atomic(target: Where, write) -> None:
    """``write(file object)`` into memory, then the whole file at once through the location
    (local disk: a temporary file flushed and renamed into place; an object store: one PUT):
    readers see the old file or the new one, never half, and an error while writing leaves
    the old file as it was."""
    buffer = io.BytesIO()
    write(buffer)
    _loc(target).write_bytes(buffer.getvalue())


# --------------------------------------------------------------------------------------
# reading, fragment by fragment: damage is proven by parsing the bytes read


def damaged_path(experiment_dir: Where):
    """Where damaged result files are kept: ``EXPERIMENT/worldmodels.parquet.damaged/``."""
    return _public(_loc(experiment_dir) / STORE_DAMAGED_DIR)


def damaged_files(experiment_dir: Where) -> list:
    """The result files set aside as damaged, oldest name first."""
    return [_public(loc) for loc in (_loc(experiment_dir) / STORE_DAMAGED_DIR).list(kind="file")]


def _key_of_name(name: str) -> tuple[str, int] | None:
    match = re.fullmatch(r"trial=(.*)-ckpt=(\d+)\.parquet", name)
    return (match.group(1), int(match.group(2))) if match else None


def _parse(name: str, data: bytes):
    """``(pyarrow.Table, None)`` for the rows a fragment's bytes promise, or ``(None, why)``
    when they do not parse or hold rows of another key. Pure: no I/O."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:  # noqa: BLE001 - the bytes are in memory: any failure is a parse failure
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"{type(exc).__name__}: {first}"
    missing = [c for c in (K.TRIAL_ID, K.CHECKPOINT_INDEX, K.METHOD) if c not in table.column_names]
    if missing:
        return None, f"no {missing} column"
    if table.num_rows == 0:
        return None, "no rows"
    key = _key_of_name(name)
    trials = table.column(K.TRIAL_ID).to_pylist()
    indexes = table.column(K.CHECKPOINT_INDEX).to_pylist()
    try:
        keys = {(_safe_id(t), int(c)) for t, c in zip(trials, indexes)}
    except (TypeError, ValueError):
        return None, "rows without a checkpoint index"
    if key is None or keys != {key}:
        return None, f"rows of {sorted(keys)} under the name of {key}"
    return table, None


_REPORTED: set[tuple[str, int]] | None = None  # inside warn_once(): (file, hash of its bytes) named


@contextlib.contextmanager
def warn_once():
    """Within this block a damaged file is named once, however many times it is read (a
    report reads the store three times); outside, every reader names it."""
    global _REPORTED
    outer, _REPORTED = _REPORTED, (set() if _REPORTED is None else _REPORTED)
    try:
        yield
    finally:
        _REPORTED = outer


def _read_bytes(loc: Location) -> bytes | None:
    """A fragment's bytes; None when it is gone. Any other failure is a StoreReadError."""
    try:
        return loc.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError as exc:
        raise StoreReadError(f"cannot read results file {loc}: {exc}; nothing was moved") from exc
    except OSError as exc:
        raise StoreReadError(f"cannot read results file {loc}: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())}; nothing was moved") from exc


def _read_fragment(loc: Location, set_aside: bool = False, data: bytes | None = None):
    """The rows of one result file as a ``pyarrow.Table``; None when it is gone or damaged.

    Damaged (its bytes do not parse, or hold another key's rows): named on stderr, and moved
    to ``worldmodels.parquet.damaged/`` only with ``set_aside``. Unreadable (permission,
    network, ...): :class:`StoreReadError`, nothing moved."""
    loc = _loc(loc)
    if data is None:
        data = _read_bytes(loc)
    if data is None:
        return None
    table, problem = _parse(loc.name, data)
    if problem is None:
        return table
    if set_aside:
        _set_aside(loc, data, problem)
    else:
        _report_damage(loc, data, problem)
    return None


def _report_damage(loc: Location, data: bytes, reason: str) -> None:
    key = (loc.uri, hash(data))
    if _REPORTED is not None:
        if key in _REPORTED:
            return
        _REPORTED.add(key)
    print(f"qworld: warning: damaged results file {loc} ({reason}); left in place. Its checkpoint "
          "counts as unscored: `qworld resume` or `qworld extract` sets it aside and scores it again.",
          file=sys.stderr, flush=True)


def _set_aside(loc: Location, data: bytes, reason: str):
    """Move a damaged result file (whose bytes ``data`` were read) to the damaged dir, never
    deleting it, and say so on stderr; returns where it went (None: not moved).

    A scorer may have replaced the file with good rows between the read and the move: the
    moved file is read again, and one that is not the damaged bytes but good rows is put
    back (unless an even newer file is there: then it is stale but whole, and kept aside)."""
    loc = _loc(loc)
    dest_dir = loc.parent.parent / STORE_DAMAGED_DIR
    dest = dest_dir / loc.name
    if dest.exists():  # damaged before: keep both
        stem, suffix = loc.name.rsplit(".", 1)
        dest = dest_dir / f"{stem}.{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}.{suffix}"
    try:
        loc.move_to(dest)
    except FileNotFoundError:  # another reader set it aside first
        return None
    moved = dest.read_bytes()
    if moved != data and _parse(loc.name, moved)[1] is None and not loc.exists():
        dest.move_to(loc)  # a fresh write landed in between: it stays in place
        return None
    print(f"qworld: warning: damaged results file {loc} ({reason}); moved to {dest}. "
          "Its checkpoint counts as unscored and is scored again.", file=sys.stderr, flush=True)
    return _public(dest)


def _fragments(experiment_dir: Where) -> list[Location]:
    return (_loc(experiment_dir) / STORE_DIR).list(_FRAGMENT_GLOB, kind="file")


def _read_many(locs: list[Location]) -> list[bytes | None]:
    """The bytes of many files: in parallel on an object store (one GET each), in order."""
    if len(locs) > 1 and not locs[0].is_local:
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(_read_bytes, locs))
    return [_read_bytes(loc) for loc in locs]


def _tables(experiment_dir: Where, set_aside: bool) -> list:
    locs = _fragments(experiment_dir)
    out = []
    for loc, data in zip(locs, _read_many(locs)):
        table = _read_fragment(loc, set_aside, data) if data is not None else None
        if table is not None:
            out.append(table)
    return out


def _to_frame(tables: list) -> pd.DataFrame:
    """One DataFrame of fragments' tables: their schemas unified (older experiments' fragments
    may disagree on a type: promoted, or concatenated by pandas when arrow cannot)."""
    import pyarrow as pa

    if len(tables) == 1:
        return tables[0].to_pandas()
    try:
        return pa.concat_tables(tables, promote_options="permissive").to_pandas()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return pd.concat([t.to_pandas() for t in tables], ignore_index=True)


def read_rows(experiment_dir: Where, trial_id: str, checkpoint_index: int,
              set_aside: bool = False) -> pd.DataFrame | None:
    """The stored rows of one (trial, checkpoint), or None when it is not scored (yet) or its
    file is damaged (named on stderr; set aside only with ``set_aside``)."""
    table = _read_fragment(_key_loc(experiment_dir, trial_id, checkpoint_index), set_aside)
    return None if table is None else table.to_pandas()


def _table_uid(table) -> str | None:
    """The checkpoint uid a fragment's rows carry (None: written before uids, or unknown)."""
    if K.CHECKPOINT_UID not in table.column_names:
        return None
    uids = {u for u in table.column(K.CHECKPOINT_UID).to_pylist() if u}
    return next(iter(uids)) if len(uids) == 1 else None


def is_stale(stored_uid: str | None, checkpoint_uid: str | None) -> bool:
    """Whether rows carrying ``stored_uid`` describe another checkpoint than the one whose uid
    is ``checkpoint_uid`` (unknown on either side: not stale, so old experiments count)."""
    return bool(stored_uid) and bool(checkpoint_uid) and stored_uid != checkpoint_uid


def is_scored(experiment_dir: Where, trial_id: str, checkpoint_index: int,
              checkpoint_uid: str | None = None, set_aside: bool = True) -> bool:
    """Whether one (trial, checkpoint) has readable rows (reads that one file only) of the
    checkpoint whose uid is ``checkpoint_uid`` (when given: rows of an earlier checkpoint
    of the same number are stale, so it is not scored). Asked before scoring, so a damaged
    file is set aside (kept) before it is replaced, unless ``set_aside=False``."""
    table = _read_fragment(_key_loc(experiment_dir, trial_id, checkpoint_index), set_aside)
    return table is not None and not is_stale(_table_uid(table), checkpoint_uid)


def fragment_attempt(experiment_dir: Where, trial_id: str, checkpoint_index: int) -> str | None:
    """The attempt id (:func:`begin_attempt`) that wrote the stored rows of a key, if any."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        data = _key_loc(experiment_dir, trial_id, checkpoint_index).read_bytes()
        metadata = pq.read_schema(pa.BufferReader(data)).metadata or {}
    except Exception:  # noqa: BLE001 - missing or damaged: no attempt to name
        return None
    value = metadata.get(ATTEMPT_METADATA_KEY)
    return value.decode() if value is not None else None


def scored_uids(experiment_dir: Where, set_aside: bool = False) -> dict[tuple[str, int], str | None]:
    """(trial_id, checkpoint_index) -> the ``checkpoint_uid`` of its stored rows (None: rows
    written before uids), for every key with readable rows. A damaged file is named (and set
    aside with ``set_aside``) and its key left out, so it is scored again."""
    out: dict[tuple[str, int], str | None] = {}
    for table in _tables(experiment_dir, set_aside):
        uid = _table_uid(table)
        for t, c in zip(table.column(K.TRIAL_ID).to_pylist(), table.column(K.CHECKPOINT_INDEX).to_pylist()):
            out[(str(t), int(c))] = uid
    return out


def scored_keys(experiment_dir: Where, set_aside: bool = False) -> set[tuple[str, int]]:
    """The (trial_id, checkpoint_index) pairs with readable rows in the store (a damaged
    file is named, set aside only with ``set_aside``, and its key left out)."""
    return set(scored_uids(experiment_dir, set_aside))


def read_store(experiment_dir: Where, set_aside: bool = False) -> pd.DataFrame:
    """Every scored row, one per (trial, checkpoint, method); empty frame if none. A damaged
    file is named on stderr (set aside only with ``set_aside``); every other row is returned."""
    tables = _tables(experiment_dir, set_aside)
    if not tables:
        return pd.DataFrame(columns=[*K.GRID_COLUMNS, K.CHECKPOINT_INDEX, K.METHOD])
    frame = _to_frame(tables)
    return frame.sort_values([K.TRIAL_ID, K.CHECKPOINT_INDEX, K.METHOD], ignore_index=True)


def conform_schema(experiment_dir: Where) -> list:
    """Rewrite the fragments whose schema is not the experiment's (the declared columns plus
    every column any fragment has, ``K.results_schema``), adding null columns and casting to
    the declared types (older fragments), so every fragment has the same schema and readers
    of the directory (pandas, pyarrow.dataset, DuckDB, polars) see every column. Rows and the
    attempt metadata are kept. Run when no scorer writes (the end of a sweep / resume /
    extract). Damaged or unreadable files are left for the readers to name. Returns the
    files rewritten."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    locs = _fragments(experiment_dir)
    try:
        datas = _read_many(locs)
    except StoreReadError:
        return []
    tables = {}
    for loc, data in zip(locs, datas):
        table = _parse(loc.name, data)[0] if data is not None else None
        if table is not None:
            tables[loc] = table
    if not tables:
        return []
    target = K.results_schema(set().union(*(t.column_names for t in tables.values())))
    rewritten = []
    for loc, table in tables.items():
        if table.schema.equals(target, check_metadata=False):
            continue
        try:
            columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
                       else pa.nulls(table.num_rows, type=f.type) for f in target]
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            print(f"qworld: warning: results file {loc} keeps its own schema ({exc})", file=sys.stderr)
            continue
        out = pa.Table.from_arrays(columns, schema=target.with_metadata(table.schema.metadata))
        _write_atomic(loc, lambda fh, out=out: pq.write_table(out, fh))
        rewritten.append(_public(loc))
    return rewritten


# --------------------------------------------------------------------------------------
# scoring attempts: EXPERIMENT/scoring_attempts/<key>-<attempt>-begin.json, -end.json

ATTEMPT_STARTED = "started"
ATTEMPT_FINISHED = "finished"
_EVENT_SUFFIX = {ATTEMPT_STARTED: "begin", ATTEMPT_FINISHED: "end"}


def attempts_path(experiment_dir: Where):
    return _public(_loc(experiment_dir) / SCORING_ATTEMPTS_DIR)


def _write_event(experiment_dir: Where, trial_id: str, checkpoint_index: int, attempt: str,
                 record: Mapping) -> None:
    """One event of an attempt as its own small object (written whole; nothing is appended)."""
    name = f"{_key_stem(trial_id, checkpoint_index)}-{attempt}-{_EVENT_SUFFIX[record['event']]}.json"
    (_loc(experiment_dir) / SCORING_ATTEMPTS_DIR / name).write_text(json.dumps(record, sort_keys=True) + "\n")


def begin_attempt(experiment_dir: Where, trial_id: str, checkpoint_index: int,
                  checkpoint_path: str | None = None, force: bool = False,
                  checkpoint_uid: str | None = None) -> str:
    """Record that this process starts scoring one (trial, checkpoint); returns the attempt id
    (pass it to :func:`write_rows` and :func:`end_attempt`)."""
    attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    record = {"event": ATTEMPT_STARTED, "attempt": attempt, K.TRIAL_ID: str(trial_id),
              K.CHECKPOINT_INDEX: int(checkpoint_index), "pid": os.getpid(),
              "host": socket.gethostname(), "time": time.time(), "force": bool(force),
              K.CHECKPOINT_PATH: None if checkpoint_path is None else str(checkpoint_path),
              K.CHECKPOINT_UID: checkpoint_uid}
    _write_event(experiment_dir, trial_id, checkpoint_index, attempt, record)
    return attempt


def end_attempt(experiment_dir: Where, trial_id: str, checkpoint_index: int, attempt: str,
                num_rows: int) -> None:
    """Record that an attempt's rows have landed in the store."""
    _write_event(experiment_dir, trial_id, checkpoint_index, attempt,
                 {"event": ATTEMPT_FINISHED, "attempt": attempt, "time": time.time(), "rows": int(num_rows)})


ATTEMPT_COLUMNS = ("attempt", K.TRIAL_ID, K.CHECKPOINT_INDEX, K.CHECKPOINT_UID, "pid", "host", "force",
                   "started", "finished", "rows")


def _events(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:  # a line cut short (the JSON-lines records of older experiments)
            continue
        if isinstance(event, dict):
            out.append(event)
    return out


def read_attempts(experiment_dir: Where) -> pd.DataFrame:
    """One row per scoring attempt: ``attempt, trial_id, checkpoint_index, checkpoint_uid`` (of
    the checkpoint it scored; None in older experiments), ``pid, host, force, started,
    finished`` (NaN: it never finished, e.g. its process was killed) and ``rows``.
    Reads the per-event objects and the JSON-lines files of older experiments (a line cut
    short by a kill is skipped)."""
    root = _loc(experiment_dir) / SCORING_ATTEMPTS_DIR
    locs = [loc for loc in root.list(kind="file") if loc.name.endswith((".json", ".jsonl"))]
    records: dict[str, dict[str, Any]] = {}
    for loc, data in zip(locs, _read_many(locs)):
        if data is None:
            continue
        for event in _events(data.decode("utf-8", "replace")):
            attempt = event.get("attempt")
            if not attempt:
                continue
            record = records.setdefault(attempt, {"attempt": attempt})
            if event.get("event") == ATTEMPT_STARTED:
                record.update({k: event.get(k) for k in ATTEMPT_COLUMNS if k in event},
                              started=event.get("time"))
            elif event.get("event") == ATTEMPT_FINISHED:
                record.update(finished=event.get("time"), rows=event.get("rows"))
    out = [r for r in records.values() if K.TRIAL_ID in r]
    frame = pd.DataFrame(out, columns=list(ATTEMPT_COLUMNS))
    return frame.sort_values(["started", "attempt"], ignore_index=True)


# --------------------------------------------------------------------------------------
# extracted world models: EXPERIMENT/worldmodels_p/trial=<id>-ckpt=<000007>.npz

WORLD_MODEL_DTYPE = np.float32


def world_models_path(experiment_dir: Where):
    return _public(_loc(experiment_dir) / WORLD_MODELS_DIR)


def _model_loc(experiment_dir: Where, trial_id: str, checkpoint_index: int) -> Location:
    # the same key as the rows' parquet file, so a model file names its rows
    return _loc(experiment_dir) / WORLD_MODELS_DIR / f"{_key_stem(trial_id, checkpoint_index)}.npz"


def _model_file(experiment_dir: Where, trial_id: str, checkpoint_index: int):
    return _public(_model_loc(experiment_dir, trial_id, checkpoint_index))


def write_world_models(experiment_dir: Where, trial_id: str, checkpoint_index: int,
                       models: Mapping[str, Any]):
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
    target = _model_loc(experiment_dir, trial_id, checkpoint_index)
    models = {method: P_hat for method, P_hat in models.items() if isinstance(P_hat, np.ndarray)}
    if not models:
        try:
            target.delete()
        except FileNotFoundError:
            pass
        return None
    arrays = {}
    for method, P_hat in models.items():
        P_hat = np.asarray(P_hat)
        if P_hat.ndim != 3 or P_hat.shape[0] != P_hat.shape[2]:
            raise ValueError(f"write_world_models: {method!r} must be P_hat[S, A, S], got {P_hat.shape}")
        arrays[str(method)] = P_hat.astype(WORLD_MODEL_DTYPE)
    # a file object: savez would append ".npz" to a temporary name
    _write_atomic(target, lambda fh: np.savez_compressed(fh, **arrays))
    return _public(target)


def world_model_keys(experiment_dir: Where) -> set[tuple[str, int]]:
    """The (trial_id, checkpoint_index) pairs with stored models (ids as in file names)."""
    keys = set()
    for loc in (_loc(experiment_dir) / WORLD_MODELS_DIR).list("trial=*-ckpt=*.npz", kind="file"):
        match = re.fullmatch(r"trial=(.*)-ckpt=(\d+)\.npz", loc.name)
        if match:
            keys.add((match.group(1), int(match.group(2))))
    return keys


def read_world_models(experiment_dir: Where, trial_id: str,
                      checkpoint_index: int) -> dict[str, np.ndarray]:
    """method -> ``P_hat[S, A, S]`` as stored (float32) for one (trial, checkpoint).

    Raises:
        FileNotFoundError: no models for that key; the message lists what is stored.
    """
    loc = _model_loc(experiment_dir, trial_id, checkpoint_index)
    try:
        data = loc.read_bytes()
    except FileNotFoundError:
        keys = world_model_keys(experiment_dir)
        if not keys:
            there = (f"no world models are stored in {world_models_path(experiment_dir)} "
                     "(an experiment scored before P_hat was stored, or a continuous env)")
        else:
            mine = sorted(c for t, c in keys if t == _safe_id(trial_id))
            there = (f"stored checkpoints of this trial: {mine}" if mine else
                     f"stored trials: {sorted({t for t, _ in keys})}")
        raise FileNotFoundError(
            f"no world models for trial {trial_id!r}, checkpoint {int(checkpoint_index)}; {there}") from None
    with np.load(io.BytesIO(data)) as npz:
        return {name: npz[name] for name in npz.files}
