"""`seekax data prepare|inspect|verify|import|export`: build a token sample store from parquet, JSON lines, CSV or
text files or a synthetic corpus, summarise one, check its checksums (exit 1 when a store is torn, incomplete or
corrupt), or move records from and to ArrayRecord files."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from seekax.ir.validate import check_int, fail

# Library parameter -> the flag's dest, for errors that name the flag.
PREPARE_PARAMS = {"path": "out", "paths": "input", "num_workers": "workers", "num_partitions": "partitions"}
STORE_PARAMS = {"path": "store"}
IMPORT_PARAMS = {"dst": "out", "path": "out"}
EXPORT_PARAMS = {"path": "store", "num_shards": "shards"}

WORDS = ("expert", "token", "latent", "pipeline", "kernel", "shard", "router", "cache", "page", "gradient",
         "warp", "tile", "schedule", "batch", "prefix", "the", "a", "of", "and", "to")


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare, inspect or verify a sample store", description=__doc__)
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    pr = dsub.add_parser("prepare", help="files or a synthetic corpus -> tokenised sample store (DuckDB partitions)",
                         params=PREPARE_PARAMS)
    pr.add_argument("out", help="sample store directory to write (missing folders are created)")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="files, globs or directories, all of one kind: parquet, JSON lines "
                                                "(.jsonl/.ndjson/.json) or CSV (.csv/.tsv), gzip'd too, one document "
                                                "per row (--text-column); or text files, one document each")
    src.add_argument("--synthetic", type=int, metavar="DOCS", help="generate this many synthetic documents")
    pr.add_argument("--text-column", default="text", help="parquet/JSON/CSV input: the column or field holding the "
                                                          "documents (a.b: field b of nested a); empty and null "
                                                          "rows are skipped and counted")
    pr.add_argument("--seq-len", type=int, default=512, help="tokens per packed sequence (one store record)")
    pr.add_argument("--partitions", type=int, default=4, help="partitions the documents are split into")
    pr.add_argument("--workers", type=int, default=2, help="worker processes (or Ray tasks) running partitions")
    pr.add_argument("--executor", choices=("process", "inline", "ray"), default="process",
                    help="where partitions run: a process pool, this process, or Ray")
    pr.add_argument("--dedupe", action="store_true", help="drop repeated texts (hash-partitioned by the text)")
    pr.add_argument("--seed", type=int, default=0, help="shuffle seed (and synthetic corpus seed)")
    pr.add_argument("--work-dir", default=None, help="intermediate partitions (default: OUT.work); reruns reuse them")
    pr.add_argument("--overwrite", action="store_true", help="replace a store already published at OUT")
    pr.add_argument("--tokenizer", default=None, metavar="TOKENIZER_JSON",
                    help="a Hugging Face tokenizer.json to tokenise with (ids packed as int32; its name and sha256 go "
                         "into the manifest); default: bytes, ids 0-255 and 256 ending a document")
    pr.add_argument("--eos-token", default=None, help="with --tokenizer: the token ending each document (default: "
                                                      "the vocabulary's end-of-sentence token, e.g. </s>)")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    pr.set_defaults(func=prepare)

    ins = dsub.add_parser("inspect", help="print a store's manifest summary", params=STORE_PARAMS)
    ins.add_argument("store", help="sample store directory")
    ins.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    ins.add_argument("--show", type=int, default=0, metavar="N", help="also print the first N records (decoded)")
    ins.set_defaults(func=inspect)

    ver = dsub.add_parser("verify", help="recompute every shard checksum; exit 1 on any problem", params=STORE_PARAMS)
    ver.add_argument("store", help="sample store directory")
    ver.add_argument("--quiet", action="store_true", help="no progress bar")
    ver.set_defaults(func=verify)

    imp = dsub.add_parser("import", help="ArrayRecord file(s) -> sample store", params=IMPORT_PARAMS)
    imp.add_argument("src", nargs="+", help="ArrayRecord files or globs (read in sorted order)")
    imp.add_argument("out", help="sample store directory to write")
    imp.add_argument("--kind", choices=("tokens", "bytes"), default=None,
                     help="store kind (default: what `seekax data export` recorded beside the files, else bytes)")
    imp.add_argument("--dtype", default=None, help="tokens: element dtype of each record, e.g. int32")
    imp.add_argument("--seq-len", type=int, default=None, help="tokens: elements per record")
    imp.add_argument("--overwrite", action="store_true", help="replace a store already published at OUT")
    imp.set_defaults(func=import_ar)

    exp = dsub.add_parser("export", help="sample store -> ArrayRecord file(s) (grain's ArrayRecordDataSource reads "
                                         "them)", params=EXPORT_PARAMS)
    exp.add_argument("store", help="sample store directory")
    exp.add_argument("out", help="ArrayRecord file to write (with --shards N: OUT-00000-of-0000N, ...)")
    exp.add_argument("--shards", type=int, default=1, help="files to split the records into, in order")
    exp.add_argument("--group-size", type=int, default=1, help="ArrayRecord group size (1: every record randomly "
                                                               "readable)")
    exp.add_argument("--overwrite", action="store_true", help="replace ArrayRecord files already at OUT")
    exp.set_defaults(func=export_ar)


def _write_parquet(table, path: Path) -> None:
    """pyarrow's write_table through a temp name: an interrupted write never leaves a torn file that a rerun
    would take as finished."""
    import pyarrow.parquet as pq

    from seekax.storage.atomic import tmp_name

    tmp = tmp_name(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _synthetic(work: Path, docs: int, seed: int, progress: bool, files: int = 4) -> list[str]:
    import pyarrow as pa
    from tqdm import tqdm

    from seekax.storage.atomic import ensure_dir

    d = ensure_dir("work_dir", work / f"synthetic-{docs}-{seed}")
    rng = np.random.default_rng(seed)
    out = []
    for f, ids in enumerate(tqdm(np.array_split(np.arange(docs), files), desc="synthetic", unit="file",
                                 disable=not progress)):
        path = d / f"part-{f:05d}.parquet"
        texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 200)))) + f" #{i}." for i in ids]
        if not path.exists():
            _write_parquet(pa.table({"id": ids, "text": texts}), path)
        out.append(str(path))
    return out


def _input_files(patterns: list[str]) -> list[str]:
    """--input's files, sorted: globs expanded, a directory replaced by the files under it (names starting with
    '.' or '_', such as Spark's `_SUCCESS` and `.crc` files, skipped); a pattern that matches nothing fails, so a
    typo does not silently drop its data."""
    import glob

    files = set()
    for p in patterns:
        found = glob.glob(p)
        if not found:
            raise fail("input", p, "an existing file, directory or glob matching some")
        for f in found:
            if not os.path.isdir(f):
                files.add(f)
                continue
            for root, dirs, names in os.walk(f):
                dirs[:] = [x for x in dirs if not x.startswith((".", "_"))]
                files.update(os.path.join(root, n) for n in names if not n.startswith((".", "_")))
    if not files:
        raise fail("input", patterns, "files to read (the directories given hold none)")
    return sorted(files)


def _input_kind(path: str) -> str:
    """parquet, json (JSON lines or a JSON array), csv (or tsv), or text (one document per file); the name says,
    a trailing .gz/.zst aside."""
    name = path.lower().removesuffix(".gz").removesuffix(".zst")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "json"
    return "csv" if name.endswith((".csv", ".tsv")) else "text"


def _stamp(paths: list[str], *extra) -> str:
    """A name for what was made from `paths`: their absolute paths, sizes and mtimes (and `extra`), so a rerun
    reuses it (and every partition computed from it) and a changed input gets a new one."""
    import hashlib

    st = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    return hashlib.sha256(repr((st, extra)).encode()).hexdigest()[:16]


def _tabular(work: Path, inputs: list[str], kind: str, column: str, progress: bool) -> list[str]:
    """JSON / CSV files -> one parquet file each under WORK/KIND-input/ holding column `text`: the --text-column
    field (`meta.body` reaches into nested objects), one document per line or row. DuckDB reads them (gzip
    too); written atomically, named by `_stamp`."""
    import duckdb
    from tqdm import tqdm

    from seekax.storage.atomic import ensure_dir
    from seekax.storage.prep import _connect, _copy_to, _ident

    d = ensure_dir("work_dir", work / f"{kind}-input")
    con = _connect(1)
    out = []
    for f in tqdm(inputs, desc="read", unit="file", disable=not progress):
        path = d / f"{_stamp([f], column)}.parquet"
        out.append(str(path))
        if path.exists():
            continue
        q = "'" + f.replace("'", "''") + "'"
        rel = (f"read_json({q}, maximum_object_size=1073741824)" if kind == "json"
               else f"read_csv({q}, header=true)")
        try:
            names = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {rel}").fetchall()]
            if column in names:
                expr = _ident(column)
            elif column.split(".")[0] in names:
                expr = ".".join(map(_ident, column.split(".")))
            else:
                raise fail("text_column", column, f"a field of {f} (it has {names})")
            ((_, ctype, *_),) = con.execute(f"DESCRIBE SELECT {expr} FROM {rel}").fetchall()
        except duckdb.Error as e:
            raise fail("text_column", column, f"a field of {f} ({str(e).splitlines()[0]})") from None
        if ctype != "VARCHAR":
            raise fail("text_column", column, f"a text field of {f}; it is {ctype}")
        try:
            _copy_to(con, f"SELECT {expr} AS text FROM {rel}", str(path))
        except duckdb.Error as e:
            raise fail("input", f, f"a readable {kind} file ({str(e).splitlines()[0]})") from None
    return out


def _text_files(work: Path, inputs: list[str], progress: bool) -> list[str]:
    """Text files, one document each (gzip'd ones decompressed) -> one parquet file under WORK/text-input/,
    named by `_stamp`. Invalid UTF-8 becomes U+FFFD, and the files holding some are named on stderr."""
    import gzip

    import pyarrow as pa
    from tqdm import tqdm

    from seekax.storage.atomic import ensure_dir

    path = ensure_dir("work_dir", work / "text-input") / f"{_stamp(inputs)}.parquet"
    if path.exists():
        return [str(path)]
    texts, bad = [], []
    for p in tqdm(inputs, desc="read", unit="file", disable=not progress):
        raw = Path(p).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(raw.decode("utf-8", errors="replace"))
            bad.append(p)
    if bad:
        print(f"seekax data prepare: warning: {len(bad)} file(s) not valid UTF-8, invalid bytes read as U+FFFD: "
              + ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else ""), file=sys.stderr)
    _write_parquet(pa.table({"path": inputs, "text": texts}), path)
    return [str(path)]


def prepare(args) -> int:
    """Interrupted (Ctrl-C): one line saying that a rerun resumes, exit 130; finished partitions are kept."""
    for dest in ("seq_len", "partitions", "workers") + (("synthetic",) if args.synthetic is not None else ()):
        check_int(dest, getattr(args, dest), min_value=1)  # before any work, named by flag
    work = Path(args.work_dir or f"{args.out}.work")
    try:
        with _overwrite_flag():
            m = _prepare(args, work)
    except KeyboardInterrupt:
        published = (Path(args.out) / "manifest.json").exists()
        print(f"\nseekax data prepare: interrupted; finished partitions are kept in {work}, rerun the same command "
              f"to resume ({args.out} {'holds the finished store' if published else 'holds no published store'})",
              file=sys.stderr)
        return 130
    skipped = m["metadata"].get("skipped_docs", 0)
    print(f"seekax data prepare: wrote {m['num_records']} sequences x {args.seq_len} tokens "
          f"({m['metadata']['docs']} documents" + (f", {skipped} empty or null skipped" if skipped else "")
          + f", {len(m['shards'])} shard(s)) to {args.out}")
    return 0


def _prepare(args, work: Path) -> dict:
    from seekax.storage.prep import Session, _ident
    from seekax.storage.sample_writer import check_target

    check_target(args.out, args.overwrite)  # an existing store or an unwritable OUT fails now, not after the work
    progress = not args.quiet
    with Session(work, num_workers=args.workers, executor=args.executor, progress=progress) as s:
        column, kinds = "text", []
        if args.synthetic is not None:
            files = _synthetic(work, args.synthetic, args.seed, progress)
        else:
            paths = _input_files(args.input)
            kinds = sorted({_input_kind(p) for p in paths})
            if len(kinds) > 1:
                raise fail("input", args.input, f"files of one kind: parquet, JSON lines, CSV or text (got {kinds})")
            if kinds == ["parquet"]:
                files, column = paths, args.text_column
            elif kinds == ["text"]:
                files = _text_files(work, paths, progress)
            else:
                files = _tabular(work, paths, kinds[0], args.text_column, progress)
        df = s.read_parquet(files)
        if column not in df.columns and column.split(".")[0] in df.columns:  # a field of a nested parquet column
            df = df.partial_sql(f"SELECT {'.'.join(map(_ident, column.split('.')))} AS text FROM {{0}}")
            column = "text"
        df = df.repartition(args.partitions, hash_by=column if args.dedupe else None)
        if args.dedupe:
            df = df.dedupe(column)
        df = df.shuffle(seed=args.seed)
        try:
            return df.to_sample_store(args.out, text_column=column, seq_len=args.seq_len, overwrite=args.overwrite,
                                      tokenizer=args.tokenizer, eos_token=args.eos_token)
        except ValueError as e:  # text files have no column to name: the files are what held nothing
            if args.synthetic is None and kinds == ["text"] and str(e).startswith("text_column="):
                raise fail("input", args.input, "text files holding some text (all are empty)") from None
            raise


def _open(path: str, cmd: str):
    """(store, 0), or (None, 1) for a torn or corrupt store; a path that is no store raises (a usage error)."""
    from seekax.storage.sample_store import CorruptStoreError, IncompleteStoreError, SampleStore

    try:
        return SampleStore(path), 0
    except (IncompleteStoreError, CorruptStoreError) as e:
        print(f"seekax data {cmd}: FAIL {e}", file=sys.stderr)
        return None, 1


def inspect(args) -> int:
    store, rc = _open(args.store, "inspect")
    if store is None:
        return rc
    summary = store.summary()
    summary["shards"] = [{"name": s.name, "records": s.records, "data_bytes": s.data_bytes} for s in store.shards]
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{summary['path']}: {summary['kind']} store, {summary['num_records']} records"
              + (f" x {summary['seq_len']} {summary['dtype']}" if summary["kind"] == "tokens" else "")
              + f", {summary['num_shards']} shard(s), {summary['data_bytes'] / 2**20:.2f} MiB")
        for k, v in summary["metadata"].items():
            print(f"  {k}: {v}")
        for s in summary["shards"]:
            print(f"  {s['name']}: {s['records']} records, {s['data_bytes']} bytes")
    if args.show:
        from seekax.storage.tokens import decode

        recs = store.read(np.arange(min(args.show, len(store))))
        for i, r in enumerate(recs):
            print(f"[{i}] {decode(r) if store.kind == 'tokens' else bytes(r)!r}")
    store.close()
    return 0


def verify(args) -> int:
    from tqdm import tqdm

    store, rc = _open(args.store, "verify")
    if store is None:
        return rc
    problems = []
    total = sum(s.data_bytes for s in store.shards)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=args.quiet, file=sys.stderr) as bar:
        for i, s in enumerate(store.shards):
            problems += store.verify_shard(i)
            bar.update(s.data_bytes)
    store.close()
    if problems:
        for p in problems:
            print(f"seekax data verify: FAIL {p}", file=sys.stderr)
        return 1
    print(f"seekax data verify: OK {args.store} ({len(store.shards)} shard(s), {store.num_records} records)")
    return 0


@contextlib.contextmanager
def _overwrite_flag():
    """The library's "pass overwrite=True" said as this command's flag."""
    try:
        yield
    except ValueError as e:
        if "pass overwrite=True" not in str(e):
            raise
        raise ValueError(str(e).replace("pass overwrite=True", "add --overwrite to replace it")) from None


def import_ar(args) -> int:
    from seekax.storage.arrayrecord import import_array_record

    with _overwrite_flag():
        m = import_array_record(args.src, args.out, kind=args.kind, dtype=args.dtype, seq_len=args.seq_len,
                                overwrite=args.overwrite)
    print(f"seekax data import: wrote {m['num_records']} {m['kind']} records ({len(m['shards'])} shard(s)) "
          f"to {args.out}")
    return 0


def export_ar(args) -> int:
    from seekax.storage.arrayrecord import export_array_record

    with _overwrite_flag():
        files = export_array_record(args.store, args.out, num_shards=args.shards, group_size=args.group_size,
                                    overwrite=args.overwrite)
    print(f"seekax data export: wrote {len(files)} ArrayRecord file(s): {', '.join(files)}")
    return 0
