"""One sweep on local disk, then the same sweep on an S3-compatible server (issue 23, item 10).

    .venv/bin/python benchmarks/storage_overhead.py                       # the demo sweep
    .venv/bin/python benchmarks/storage_overhead.py --file tune_configs/smoke.yaml --set stop.env_steps=20000
    .venv/bin/python benchmarks/storage_overhead.py --order s3-first

Runs ``qworld sweep FILE --storage <tmp>/local --set wandb.mode=disabled`` and
``qworld sweep FILE --storage s3://<bucket>/exp --set wandb.mode=disabled`` one after the other
(local first unless ``--order s3-first``), each as its own process, as a user runs them. The
S3 API is moto's standalone server (real HTTP, ``moto_server`` in its own process on
127.0.0.1 at a free port, so it does not share a GIL with anything timed); the sweep finds it
through the standard AWS variables (``AWS_ENDPOINT_URL`` and friends). W&B is disabled in both
so that the comparison is storage only.

Measures per storage: wall time of the sweep process, the number of checkpoints, and the bytes
the experiment holds when the sweep ends (local: a walk of the dir; S3: a recursive listing of
the prefix), per checkpoint and split into checkpoints (files under ``*/checkpoint_*/``), the
results store (``worldmodels.parquet/``, ``worldmodels_p/``, ``scoring_attempts/``) and Tune's
trial files and the rest (``params.json``, ``result.json``, ``progress.csv``, experiment state,
``sweep.yaml``). Also the S3 requests by method (the server's request log), the scored rows
and error rows of each experiment (``qworld.sweep.store``), and the console's tracebacks.
Prints a table and writes a small JSON to ``--out``. Bytes are those stored at the end; a file
rewritten during the sweep (Tune's experiment state) counts once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from qworld.layout import SCORING_ATTEMPTS_DIR, STORE_DAMAGED_DIR, STORE_DIR, WORLD_MODELS_DIR  # noqa: E402

RESULTS_DIRS = {STORE_DIR, STORE_DAMAGED_DIR, WORLD_MODELS_DIR, SCORING_ATTEMPTS_DIR}
CATEGORIES = ("checkpoints", "results", "tune")
ACCESS_KEY, SECRET_KEY = "qworld-bench", "qworld-bench-secret"
# Read back after each sweep in its own process (the sweep's environment): rows and error rows.
INSPECT = """
import json, sys
from qworld import metrics as K
from qworld.sweep import store
rows = store.read_store(sys.argv[1])
err = rows[K.ERROR].dropna() if K.ERROR in rows else rows.iloc[:0, :0]
keys = rows[[K.TRIAL_ID, K.CHECKPOINT_INDEX]].drop_duplicates() if len(rows) else rows
print(json.dumps({"rows": int(len(rows)), "scored_checkpoints": int(len(keys)),
                  "error_rows": int(len(err)),
                  "errors": sorted({str(e).splitlines()[0][:200] for e in err})[:5]}))
"""


def python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def category(rel: tuple[str, ...]) -> str:
    """``rel``: a file's path below the experiment dir."""
    if len(rel) >= 3 and rel[1].startswith("checkpoint_"):
        return "checkpoints"
    if rel[0] in RESULTS_DIRS:
        return "results"
    return "tune"


def tally(files: list[tuple[str, int]]) -> dict:
    """``files``: (path below the storage root, size). The root holds one experiment dir."""
    out = {c: {"bytes": 0, "files": 0} for c in CATEGORIES}
    experiments, checkpoints = set(), set()
    for path, size in files:
        parts = tuple(p for p in path.split("/") if p)
        experiments.add(parts[0])
        rel = parts[1:]
        if not rel:
            continue
        cat = category(rel)
        out[cat]["bytes"] += size
        out[cat]["files"] += 1
        if cat == "checkpoints":
            checkpoints.add(rel[:2])
    total = sum(out[c]["bytes"] for c in CATEGORIES)
    n = len(checkpoints)
    return {"experiments": sorted(experiments), "checkpoints": n,
            "trials": len({t for t, _ in checkpoints}),
            "files": sum(out[c]["files"] for c in CATEGORIES), "bytes": total,
            "by_category": out,
            "bytes_per_checkpoint": {"total": round(total / n) if n else None,
                                     **{c: (round(out[c]["bytes"] / n) if n else None) for c in CATEGORIES}}}


def walk_local(root: Path) -> list[tuple[str, int]]:
    files = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                files.append((p.relative_to(root).as_posix(), p.stat().st_size))
    return files


def s3_fs(endpoint_hostport: str):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=endpoint_hostport, scheme="http", access_key=ACCESS_KEY,
                             secret_key=SECRET_KEY, region="us-east-1", allow_bucket_creation=True)


def list_s3(fs, prefix: str) -> list[tuple[str, int]]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return [(i.path[len(prefix):].lstrip("/"), i.size) for i in infos if i.type == pafs.FileType.File]


class MotoServer:
    """moto's standalone S3 server in its own process; its request log goes to ``log``."""

    def __init__(self, log: Path):
        self.port = free_port()
        self.hostport = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.hostport}"
        self.log = log
        entry = Path(sys.executable).parent / "moto_server"
        cmd = [str(entry)] if entry.exists() else [sys.executable, "-m", "moto.server"]
        self._fh = open(log, "w")
        self.proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/moto-api/", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start (log: {log})")
                time.sleep(0.3)
        self.mark()

    def mark(self) -> None:
        """Count requests from here on (after the readiness probe and the bucket's creation)."""
        self._start_offset = self.log.stat().st_size

    def requests(self, prefix: str) -> dict:
        """S3 requests since :meth:`mark`: by method, by category of the key below ``prefix``
        (``/bucket/exp``; ``other`` for the bucket itself), and the answers not 2xx/3xx."""
        text = self.log.read_text(errors="replace")[self._start_offset:]
        methods, bad, by_cat = Counter(), Counter(), {}
        for m in re.finditer(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+" (\d{3})', text):
            method, target, code = m.groups()
            methods[method] += 1
            if not code.startswith(("2", "3")):
                bad[f"{method} {code}"] += 1
            key = urllib.parse.unquote(target.split("?", 1)[0])
            rel = tuple(p for p in key[len(prefix):].split("/") if p)[1:] if key.startswith(prefix + "/") else ()
            cat = category(rel) if rel else "other"
            by_cat.setdefault(cat, Counter())[method] += 1
        return {"by_method": dict(methods), "by_category": {c: dict(v) for c, v in by_cat.items()},
                "not_ok": dict(bad)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()


def run_sweep(label: str, file: str, storage: str, sets: list[str], env: dict, log: Path,
              timeout: float | None) -> dict:
    cmd = [python(), "-m", "qworld.cli", "sweep", file, "--storage", storage, "--set", "wandb.mode=disabled"]
    for s in sets:
        cmd += ["--set", s]
    print(f"[{label}] $ {' '.join(cmd)}", flush=True)
    lines = tracebacks = 0
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        timer = threading.Timer(timeout, proc.terminate) if timeout else None
        if timer:
            timer.start()
        try:
            for line in proc.stdout:
                fh.write(line)
                lines += 1
                tracebacks += line.startswith("Traceback")
                print(f"[{label}] {line}", end="", flush=True)
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
    wall = time.perf_counter() - t0
    print(f"[{label}] exit {rc}, {wall:.1f} s", flush=True)
    return {"wall_s": round(wall, 1), "rc": rc, "console_lines": lines, "tracebacks": tracebacks}


def inspect(experiment: str, env: dict) -> dict:
    out = subprocess.run([python(), "-c", INSPECT, experiment], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"inspect_error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def minsec(s: float) -> str:
    return f"{int(s // 60)} min {s % 60:.0f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", default="tune_configs/fourrooms_demo.yaml", help="the sweep file (default: the demo)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="passed through to both sweeps (repeatable)")
    ap.add_argument("--order", choices=("local-first", "s3-first"), default="local-first",
                    help="which storage runs first (default local-first)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "storage_overhead.json"),
                    help="the JSON written (default benchmarks/results/storage_overhead.json)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per sweep before it is stopped (SIGTERM)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (local experiment, logs)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="qworld-storage-bench-"))
    bucket = f"qworld-bench-{uuid.uuid4().hex[:8]}"
    order = ["local", "s3"] if args.order == "local-first" else ["s3", "local"]
    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "file": args.file, "sets": args.sets,
              "order": args.order, "cpus": os.cpu_count(), "load_before": load(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                       capture_output=True, text=True).stdout.strip(),
              "runs": {}}
    print(f"temp dir {tmp}; load average before: {report['load_before']}", flush=True)
    base_env = dict(os.environ)
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        base_env.pop(key, None)
    server = None
    try:
        for i, which in enumerate(order):
            if i:
                report["load_between"] = load()
            if which == "local":
                storage = str(tmp / "local")
                res = run_sweep("local", args.file, storage, args.sets, base_env, tmp / "local.log", args.timeout)
                res.update(tally(walk_local(Path(storage))))
                env = base_env
            else:
                server = MotoServer(tmp / "moto.log")
                fs = s3_fs(server.hostport)
                fs.create_dir(bucket)
                server.mark()
                env = {**base_env, "AWS_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                       "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}
                storage = f"s3://{bucket}/exp"
                res = run_sweep("s3", args.file, storage, args.sets, env, tmp / "s3.log", args.timeout)
                res["s3_requests"] = server.requests(f"/{bucket}/exp")  # the sweep's own requests (before the listing)
                res.update(tally(list_s3(fs, f"{bucket}/exp")))
            res["storage"] = storage
            for name in res["experiments"]:
                res.setdefault("store", {})[name] = inspect(f"{storage.rstrip('/')}/{name}", env)
            report["runs"][which] = res
    finally:
        if server is not None:
            server.stop()
        report["load_after"] = load()
        if args.keep:
            print(f"kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    runs = report["runs"]
    if "local" in runs and "s3" in runs:
        report["ratio_s3_local"] = round(runs["s3"]["wall_s"] / runs["local"]["wall_s"], 3)
    print()
    head = ["storage", "wall", "rc", "ckpts", "scored", "error rows", "bytes/ckpt", "checkpoints", "results",
            "tune+rest", "files"]
    table = [head]
    for which in order:
        r = runs.get(which)
        if r is None:
            continue
        per = r["bytes_per_checkpoint"]
        st = next(iter(r.get("store", {}).values()), {})
        table.append([which, minsec(r["wall_s"]), str(r["rc"]), str(r["checkpoints"]),
                      str(st.get("scored_checkpoints", "?")), str(st.get("error_rows", "?")),
                      human(per["total"]), human(per["checkpoints"]), human(per["results"]), human(per["tune"]),
                      str(r["files"])])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if "ratio_s3_local" in report:
        print(f"\ns3 / local wall time: {report['ratio_s3_local']:.3f}x (goal <= 1.1x)")
    if "s3" in runs:
        req = runs["s3"]["s3_requests"]
        print(f"S3 requests by method: {req['by_method']}; not 2xx/3xx: {req['not_ok'] or 'none'}")
        for cat, counts in sorted(req["by_category"].items()):
            print(f"  {cat}: {counts}")
    print(f"load average before / after: {report['load_before']} / {report['load_after']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["rc"] == 0 for r in runs.values()) and len(runs) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
