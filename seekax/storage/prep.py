"""Data preparation, smallpond-style: lazy partitioned DataFrames whose partitions DuckDB computes one by one.

    sess = Session("work/", num_workers=2)
    df = sess.read_parquet("raw/*.parquet").repartition(8, hash_by="url").dedupe("url")
    df = df.partial_sql("SELECT url, text FROM {0} WHERE length(text) > 100").shuffle(seed=0)
    df.write_parquet("clean/");  df.to_sample_store("store/", text_column="text", seq_len=4096)

Each operation is a node with a deterministic id (hash of its parameters, its parent's id and the input files'
sizes and mtimes); a node's partitions are written under `work/<id>/` as parquet plus a marker written
atomically once the partition is complete, so a rerun skips finished partitions. Per-partition work runs as
plain task dicts on a local process pool (default), inline, or on Ray when installed and asked for
(`executor="ray"`): the hand-written part is only this glue.

Semantics are per partition, as in smallpond: `dedupe` and `sort` act within each partition (hash-partition by
the key first for a global dedupe); `shuffle(seed)` is deterministic for a given DuckDB version.
`partial_sql` queries name the partition's table `{0}` and may use `{partition}` (its index).
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from seekax.ir.validate import check_choice, check_int, fail
from seekax.storage.atomic import atomic_write_json, ensure_dir, tmp_name
from seekax.storage.extras import require_data_extra

EXECUTORS = ("process", "inline", "ray")


def _sql_list(files: Sequence[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- tasks: plain dicts, run in any process ---------------------------------------------------------------------
def _connect(threads: int):
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute(f"SET threads TO {int(threads)}")
    con.execute("SET preserve_insertion_order TO true")
    return con


def _copy_to(con, query: str, out: str) -> None:
    tmp = str(tmp_name(out))
    try:
        con.execute(f"COPY ({query}) TO '{tmp}' (FORMAT parquet)")
        fd = os.open(tmp, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_task(task: dict) -> dict:
    """Execute one partition task unless its marker exists; writes outputs, then the marker. Returns the marker."""
    marker = Path(task["marker"])
    if marker.exists():
        return json.loads(marker.read_text())
    con = _connect(task.get("threads", 1))
    src = f"read_parquet({_sql_list(task['inputs'])})"
    info: dict[str, Any] = {}
    if task["kind"] == "sql":
        _copy_to(con, task["query"].format(src, partition=task["partition"]), task["out"])
        info["rows"] = con.execute(f"SELECT count(*) FROM read_parquet('{task['out']}')").fetchone()[0]
    elif task["kind"] == "split":
        n, i = task["num_outputs"], task["partition"]
        key = (f"hash({', '.join(map(_ident, task['hash_by']))}) % {n}" if task["hash_by"]
               else f"(row_number() OVER () - 1 + {i}) % {n}")
        con.execute(f"CREATE TEMP TABLE t AS SELECT *, {key} AS __bucket FROM {src}")
        for j, out in enumerate(task["outs"]):
            _copy_to(con, f"SELECT * EXCLUDE (__bucket) FROM t WHERE __bucket = {j}", out)
        info["rows"] = con.execute("SELECT count(*) FROM t").fetchone()[0]
    elif task["kind"] == "tokenize":
        import numpy as np

        from seekax.storage.tokenizer import load_tokenizer
        from seekax.storage.tokens import pack

        rows_in = [r[0] for r in con.execute(f"SELECT {_ident(task['column'])} FROM {src}").fetchall()]
        texts = [t for t in rows_in if t != "" and t is not None]  # an empty document would be a lone EOS
        tokenizer = load_tokenizer(task.get("tokenizer"), task.get("eos_token"))
        rows, tail = pack(texts, task["seq_len"], tokenizer)
        tmp = tmp_name(task["out"])
        try:
            with open(tmp, "wb") as f:
                np.save(f, rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, task["out"])
        finally:  # an interrupt (Ctrl-C) mid-write leaves no partial temp file behind
            tmp.unlink(missing_ok=True)
        info.update(rows=int(len(rows)), docs=len(texts), skipped_docs=len(rows_in) - len(texts),
                    dropped_tail_tokens=int(len(tail)))
    else:
        raise fail("task.kind", task["kind"], "one of ('sql', 'split', 'tokenize')")
    atomic_write_json(marker, info)
    return info


# -- plan ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Node:
    op: str  # "source" | "split" | "sql"
    params: tuple
    parent: "_Node | None"
    num_partitions: int

    @property
    def id(self) -> str:
        h = hashlib.sha256(repr((self.op, self.params, self.parent.id if self.parent else None)).encode())
        return f"{self.op}-{h.hexdigest()[:16]}"


SPAWN_HINT = ("a worker process of the Session died. executor='process' spawns its workers, and each one imports "
              "the main module: a script that makes a Session must do so under `if __name__ == \"__main__\":` "
              "(else every worker runs the script again), or pass executor='inline'")


class Session:
    """`Session(work_dir, num_workers=2, executor="process"|"inline"|"ray", progress=False)`.

    executor="process" spawns worker processes, which import the main module: in a script, make the Session
    under `if __name__ == "__main__":` (as for any spawned multiprocessing)."""

    def __init__(self, work_dir: str | os.PathLike, *, num_workers: int = 2, executor: str = "process",
                 duckdb_threads: int = 1, progress: bool = False):
        require_data_extra("duckdb", "pyarrow", feature="data preparation (seekax.storage.prep.Session, seekax "
                                                         "data prepare)")
        self.work_dir = ensure_dir("work_dir", work_dir)
        self.num_workers = check_int("num_workers", num_workers, min_value=1)
        self.executor = check_choice("executor", executor, EXECUTORS)
        if executor == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise fail("executor", "ray", "Ray installed (`pip install ray`; optional, the default is "
                                              "executor='process')") from None
        self.duckdb_threads = check_int("duckdb_threads", duckdb_threads, min_value=1)
        self.progress = progress
        self._pool = None
        self.last_run = {"tasks": 0, "skipped": 0}

    def read_parquet(self, paths: str | Sequence[str], *, num_partitions: int | None = None) -> "DataFrame":
        """Parquet files (a glob or a list) with one schema; one partition per file unless num_partitions."""
        pattern = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        files = sorted({os.path.abspath(f) for p in pattern for f in glob.glob(os.fspath(p))})
        if not files:
            raise fail("paths", paths, "at least one existing parquet file")
        import pyarrow.parquet as pq

        schema0 = pq.read_schema(files[0])
        for f in files[1:]:
            s = pq.read_schema(f)
            if not s.equals(schema0):
                raise fail("paths", f, f"a parquet file with the same schema as {files[0]} "
                                       f"({schema0.to_string(show_schema_metadata=False)}), got "
                                       f"({s.to_string(show_schema_metadata=False)})")
        n = len(files) if num_partitions is None else check_int("num_partitions", num_partitions, min_value=1)
        stamp = tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)
        return DataFrame(self, _Node("source", (stamp,), None, min(n, len(files))))

    # -- execution -----------------------------------------------------------------------------------------------
    def _files(self, node: _Node, j: int) -> list[str]:
        if node.op == "source":
            files = [f for f, _, _ in node.params[0]]
            return files[j::node.num_partitions]
        d = self.work_dir / node.id
        if node.op == "split":
            return [str(d / f"bucket-{i:05d}-{j:05d}.parquet") for i in range(node.parent.num_partitions)]
        return [str(d / f"part-{j:05d}.parquet")]

    def _relation(self, node: _Node) -> str:
        """SQL for the node's whole data, without computing it (used for schemas)."""
        if node.op == "source":
            return f"read_parquet({_sql_list([f for f, _, _ in node.params[0]])})"
        if node.op == "split":
            return self._relation(node.parent)
        return "(" + node.params[0].format(self._relation(node.parent), partition=0) + ")"

    def _tasks(self, node: _Node) -> list[dict]:
        d = self.work_dir / node.id
        base = {"threads": self.duckdb_threads}
        if node.op == "split":
            n = node.num_partitions
            return [{**base, "kind": "split", "partition": i, "num_outputs": n, "hash_by": list(node.params[1]),
                     "inputs": self._files(node.parent, i), "marker": str(d / f"split-{i:05d}.done"),
                     "outs": [str(d / f"bucket-{i:05d}-{j:05d}.parquet") for j in range(n)]}
                    for i in range(node.parent.num_partitions)]
        return [{**base, "kind": "sql", "partition": j, "query": node.params[0], "inputs": self._files(node.parent, j),
                 "out": str(d / f"part-{j:05d}.parquet"), "marker": str(d / f"part-{j:05d}.done")}
                for j in range(node.num_partitions)]

    def _compute(self, node: _Node) -> None:
        if node.op == "source":
            return
        self._compute(node.parent)
        ensure_dir("work_dir", self.work_dir / node.id)
        self.run(self._tasks(node), desc=node.op)

    def run(self, tasks: list[dict], desc: str = "tasks") -> list[dict]:
        """Run tasks whose marker is missing on the configured executor; returns every task's marker info."""
        from tqdm import tqdm

        todo = [t for t in tasks if not Path(t["marker"]).exists()]
        self.last_run["tasks"] += len(tasks)
        self.last_run["skipped"] += len(tasks) - len(todo)
        with tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=desc, unit="part",
                  disable=not self.progress) as bar:
            if self.executor == "inline" or len(todo) <= 1:
                for t in todo:
                    run_task(t)
                    bar.update(1)
            elif self.executor == "process":
                if self._pool is None:
                    self._pool = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"))
                try:
                    for _ in self._pool.map(run_task, todo):
                        bar.update(1)
                except BrokenProcessPool as e:
                    self._pool = None
                    raise RuntimeError(SPAWN_HINT) from e
            else:
                import ray

                remote = ray.remote(run_task)
                for _ in ray.get([remote.remote(t) for t in todo]):
                    bar.update(1)
        return [json.loads(Path(t["marker"]).read_text()) for t in tasks]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self._pool is not None:  # e.g. Ctrl-C: stop, do not finish the queued tasks
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        self.close()


class DataFrame:
    """A lazy, partitioned table. Operations return new DataFrames; `compute`/`write_*`/`to_*` run them."""

    def __init__(self, session: Session, node: _Node):
        self.session, self.node = session, node

    @property
    def num_partitions(self) -> int:
        return self.node.num_partitions

    def schema(self) -> list[tuple[str, str]]:
        """[(column, DuckDB type)] of the result, computed from the plan without running it."""
        con = _connect(1)
        try:
            rows = con.execute(f"DESCRIBE SELECT * FROM {self.session._relation(self.node)} LIMIT 0").fetchall()
        except Exception as e:  # noqa: BLE001 - duckdb.Error subclasses: bad SQL, unknown column, ...
            what = self.node.params[0] if self.node.op == "sql" else self.node.op
            raise fail("query", what, f"valid SQL ({e})") from None
        return [(r[0], r[1]) for r in rows]

    @property
    def columns(self) -> list[str]:
        return [c for c, _ in self.schema()]

    def _check_columns(self, name: str, cols: Sequence[str]) -> tuple[str, ...]:
        cols = (cols,) if isinstance(cols, str) else tuple(cols)
        have = self.columns
        for c in cols:
            if c not in have:
                raise fail(name, c, f"a column among {have}")
        if not cols:
            raise fail(name, cols, "at least one column")
        return cols

    def _sql(self, query: str) -> "DataFrame":
        df = DataFrame(self.session, _Node("sql", (query,), self.node, self.num_partitions))
        df.schema()  # validate now (unknown columns, syntax), not inside a worker later
        return df

    # -- operations ----------------------------------------------------------------------------------------------
    def repartition(self, n: int, *, hash_by: str | Sequence[str] | None = None) -> "DataFrame":
        """n partitions: rows with equal `hash_by` values land together; round-robin without hash_by."""
        n = check_int("n", n, min_value=1)
        keys = () if hash_by is None else self._check_columns("hash_by", hash_by)
        return DataFrame(self.session, _Node("split", (n, keys), self.node, n))

    def partial_sql(self, query: str) -> "DataFrame":
        """Run `query` on every partition; `{0}` is the partition's table, `{partition}` its index."""
        if not isinstance(query, str) or "{0}" not in query:
            raise fail("query", query, "a SQL string naming the partition's table as {0}")
        return self._sql(query)

    def shuffle(self, seed: int = 0) -> "DataFrame":
        """Deterministic per-partition shuffle (hash of row number, seed and partition index)."""
        seed = check_int("seed", seed)
        return self._sql("SELECT * EXCLUDE (__rn) FROM (SELECT *, row_number() OVER () AS __rn FROM {0}) "
                         f"ORDER BY hash(__rn, {seed}, {{partition}}), __rn")

    def dedupe(self, *columns: str) -> "DataFrame":
        """Keep the first row of each distinct `columns` value within a partition (order kept)."""
        cols = ", ".join(map(_ident, self._check_columns("columns", columns)))
        return self._sql("SELECT * EXCLUDE (__rn) FROM (SELECT *, row_number() OVER () AS __rn FROM {0}) "
                         f"QUALIFY row_number() OVER (PARTITION BY {cols} ORDER BY __rn) = 1 ORDER BY __rn")

    def sort(self, *columns: str, descending: bool = False) -> "DataFrame":
        cols = self._check_columns("columns", columns)
        order = ", ".join(f"{_ident(c)} {'DESC' if descending else 'ASC'}" for c in cols)
        return self._sql(f"SELECT * FROM {{0}} ORDER BY {order}")

    # -- results -------------------------------------------------------------------------------------------------
    def compute(self) -> list[list[str]]:
        """Materialise every partition; returns each partition's parquet files."""
        self.session._compute(self.node)
        return [self.session._files(self.node, j) for j in range(self.num_partitions)]

    def to_arrow(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = self.compute()
        return pa.concat_tables([pq.read_table(f) for files in parts for f in files])

    def count(self) -> int:
        return self.to_arrow().num_rows

    def write_parquet(self, out_dir: str | os.PathLike) -> list[str]:
        """One file per partition, `out_dir/part-00000.parquet`...; rerunnable (finished files are kept)."""
        out = ensure_dir("out_dir", out_dir)
        parts = self.compute()
        marks = ensure_dir("work_dir", self.session.work_dir / f"write-{self.node.id}")
        tasks = [{"kind": "sql", "partition": j, "query": "SELECT * FROM {0}", "inputs": files,
                  "threads": self.session.duckdb_threads, "out": str(out / f"part-{j:05d}.parquet"),
                  "marker": str(marks / f"{hashlib.sha256(str(out).encode()).hexdigest()[:8]}-{j:05d}.done")}
                 for j, files in enumerate(parts)]
        self.session.run(tasks, desc="write_parquet")
        return [t["out"] for t in tasks]

    def to_sample_store(self, path: str | os.PathLike, *, text_column: str, seq_len: int,
                        overwrite: bool = False, shard_bytes: int = 256 << 20, tokenizer: str | os.PathLike |
                        None = None, eos_token: str | None = None) -> dict:
        """Tokenise `text_column`, pack rows of `seq_len` int32 per partition, write a token store (partitions in
        order). `tokenizer`: a Hugging Face tokenizer.json (None: bytes, ids 0-255 and EOS 256); its identity
        goes into the manifest's metadata. Returns the store manifest."""
        from seekax.storage.sample_store import SampleStoreWriter
        from seekax.storage.sample_writer import check_target
        from seekax.storage.tokenizer import load_tokenizer

        check_target(path, overwrite)  # an existing store or an unwritable folder fails now, not after the work
        tok_path = None if tokenizer is None else str(Path(tokenizer).absolute())
        identity = load_tokenizer(tok_path, eos_token).identity()  # a bad path or eos fails here, not in a worker

        (col,) = self._check_columns("text_column", text_column)
        ctype = dict(self.schema())[col]
        if ctype != "VARCHAR":
            raise fail("text_column", col, f"a text (VARCHAR) column; {col} is {ctype}")
        seq_len = check_int("seq_len", seq_len, min_value=1)
        parts = self.compute()
        d = ensure_dir("work_dir", self.session.work_dir / f"tok-{self.node.id}-{col}-{seq_len}-"
                                                           f"{identity['sha256'][:12]}-{identity['eos_id']}-v2")
        tasks = [{"kind": "tokenize", "partition": j, "inputs": files, "column": col, "seq_len": seq_len,
                  "tokenizer": tok_path, "eos_token": eos_token,
                  "threads": self.session.duckdb_threads, "out": str(d / f"tokens-{j:05d}.npy"),
                  "marker": str(d / f"tokens-{j:05d}.done")} for j, files in enumerate(parts)]
        infos = self.session.run(tasks, desc="tokenize")
        import numpy as np
        from tqdm import tqdm

        meta = {"source": "seekax.storage.prep", "tokenizer": identity, "text_column": col,
                "docs": sum(i["docs"] for i in infos), "skipped_docs": sum(i["skipped_docs"] for i in infos),
                "dropped_tail_tokens": sum(i["dropped_tail_tokens"] for i in infos)}
        total = sum(i["rows"] for i in infos)
        if not meta["docs"]:  # an empty store would only fail later, in the loader
            raise fail("text_column", col, f"a column holding documents (all {meta['skipped_docs']} rows are "
                                           "empty or null)")
        if not total:
            most = max(i["rows"] * seq_len + i["dropped_tail_tokens"] for i in infos)
            raise fail("seq_len", seq_len, f"at most {most} tokens, the most one of the {len(infos)} "
                                           f"partition(s) holds: no partition fills a sequence, nothing to write")
        with SampleStoreWriter(path, kind="tokens", seq_len=seq_len, dtype="int32", overwrite=overwrite,
                               shard_bytes=shard_bytes, metadata=meta) as w, \
                tqdm(total=total, desc="write", unit="seq", disable=not self.session.progress) as bar:
            for t in tasks:
                rows = np.load(t["out"], mmap_mode="r")
                for lo in range(0, len(rows), 1 << 16):
                    chunk = rows[lo:lo + (1 << 16)]
                    w.write(chunk)
                    bar.update(len(chunk))
        from seekax.storage.atomic import read_json

        return read_json(Path(path) / "manifest.json")

    def clear_cache(self) -> None:
        """Delete this node's intermediate partitions (the next run recomputes them)."""
        shutil.rmtree(self.session.work_dir / self.node.id, ignore_errors=True)
