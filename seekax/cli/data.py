"""`seekax data prepare|inspect|verify|import|export`: build a token sample store from parquet/text files or a
synthetic corpus, summarise one, check its checksums (exit 1 when a store is torn, incomplete or corrupt), or
move records from and to ArrayRecord files."""

from __future__ import annotations

import json
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
    src.add_argument("--input", nargs="+", help="parquet files/globs (with --text-column), or text files (one "
                                                "document each)")
    src.add_argument("--synthetic", type=int, metavar="DOCS", help="generate this many synthetic documents")
    pr.add_argument("--text-column", default="text", help="parquet input: the column holding the documents")
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


def _synthetic(work: Path, docs: int, seed: int, files: int = 4) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from seekax.storage.atomic import ensure_dir

    d = ensure_dir("work_dir", work / f"synthetic-{docs}-{seed}")
    rng = np.random.default_rng(seed)
    out = []
    for f, ids in enumerate(np.array_split(np.arange(docs), files)):
        path = d / f"part-{f:05d}.parquet"
        texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 200)))) + f" #{i}." for i in ids]
        if not path.exists():
            pq.write_table(pa.table({"id": ids, "text": texts}), path)
        out.append(str(path))
    return out


def _text_files(work: Path, inputs: list[str]) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from seekax.storage.atomic import ensure_dir

    texts = [Path(p).read_text(encoding="utf-8", errors="replace") for p in inputs]
    d = ensure_dir("work_dir", work / "text-input")
    path = d / "part-00000.parquet"
    pq.write_table(pa.table({"path": inputs, "text": texts}), path)
    return [str(path)]


def prepare(args) -> int:
    import glob

    from seekax.storage.prep import Session

    for dest in ("seq_len", "partitions", "workers") + (("synthetic",) if args.synthetic is not None else ()):
        check_int(dest, getattr(args, dest), min_value=1)  # before any work, named by flag
    work = Path(args.work_dir or f"{args.out}.work")
    with Session(work, num_workers=args.workers, executor=args.executor, progress=not args.quiet) as s:
        if args.synthetic is not None:
            files, column = _synthetic(work, args.synthetic, args.seed), "text"
        else:
            paths = sorted({f for p in args.input for f in glob.glob(p)})
            if not paths:
                raise fail("input", args.input, "existing files")
            if all(p.endswith(".parquet") for p in paths):
                files, column = paths, args.text_column
            elif not any(p.endswith(".parquet") for p in paths):
                files, column = _text_files(work, paths), "text"
            else:
                raise fail("input", args.input, "all parquet or all text files")
        df = s.read_parquet(files)
        df = df.repartition(args.partitions, hash_by=column if args.dedupe else None)
        if args.dedupe:
            df = df.dedupe(column)
        df = df.shuffle(seed=args.seed)
        m = df.to_sample_store(args.out, text_column=column, seq_len=args.seq_len, overwrite=args.overwrite,
                               tokenizer=args.tokenizer, eos_token=args.eos_token)
    print(f"seekax data prepare: wrote {m['num_records']} sequences x {args.seq_len} tokens "
          f"({m['metadata']['docs']} documents, {len(m['shards'])} shard(s)) to {args.out}")
    return 0


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


def import_ar(args) -> int:
    from seekax.storage.arrayrecord import import_array_record

    m = import_array_record(args.src, args.out, kind=args.kind, dtype=args.dtype, seq_len=args.seq_len,
                            overwrite=args.overwrite)
    print(f"seekax data import: wrote {m['num_records']} {m['kind']} records ({len(m['shards'])} shard(s)) "
          f"to {args.out}")
    return 0


def export_ar(args) -> int:
    from seekax.storage.arrayrecord import export_array_record

    files = export_array_record(args.store, args.out, num_shards=args.shards, group_size=args.group_size,
                                overwrite=args.overwrite)
    print(f"seekax data export: wrote {len(files)} ArrayRecord file(s): {', '.join(files)}")
    return 0
