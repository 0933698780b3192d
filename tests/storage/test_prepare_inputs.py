"""`seekax data prepare` on a user's own files: JSON lines / CSV / gzip / directories / text, empty and null
rows, output folders that exist or cannot be written, interrupts and reruns. Tokens in must equal tokens out."""

import csv
import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seekax.cli.main import main
from seekax.storage.sample_store import SampleStore
from seekax.storage.tokens import EOS, decode

DOCS = ["hello world", "你好，世界 🌍🚀", "", None, "long " * 400, "tail doc"]
KEPT = [d for d in DOCS if d]


def _prepare(out, *inputs, seq_len=16, extra=()):
    return main(["data", "prepare", str(out), "--input", *map(str, inputs), "--seq-len", str(seq_len),
                 "--partitions", "1", "--executor", "inline", "--quiet", *extra])


def _stream(out) -> tuple[np.ndarray, dict]:
    """Every token of the store (records in order) and the manifest's metadata."""
    with SampleStore(out) as s:
        return s.read(np.arange(len(s))).reshape(-1), s.manifest["metadata"]


def _check_tokens(out, docs):
    """Each kept document's bytes plus one EOS, no more and no less (the dropped tail counted)."""
    toks, meta = _stream(out)
    assert meta["docs"] == len(docs)
    assert len(toks) + meta["dropped_tail_tokens"] == sum(len(d.encode()) + 1 for d in docs)
    assert (toks == EOS).sum() <= len(docs)
    return toks, meta


def test_jsonl_lines_are_documents_by_field(tmp_path, capsys):
    rows = [{"text": d, "id": i, "meta": {"body": d}, "content": d} for i, d in enumerate(DOCS)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for name, inputs, col in [("plain", ["a.jsonl"], "text"), ("gz", ["b.jsonl.gz"], "text"),
                              ("other", ["a.jsonl"], "content"), ("nested", ["a.jsonl"], "meta.body"),
                              ("both", ["a.jsonl", "b.jsonl.gz"], "text")]:
        out = tmp_path / name
        assert _prepare(out, *[tmp_path / i for i in inputs], extra=("--text-column", col)) == 0, name
        toks, meta = _check_tokens(out, KEPT * len(inputs))
        assert meta["skipped_docs"] == 2 * len(inputs)
        assert '{"text"' not in decode(toks) and "hello world" in decode(toks)
    capsys.readouterr()
    assert _prepare(tmp_path / "x", tmp_path / "a.jsonl", extra=("--text-column", "body")) == 2
    err = capsys.readouterr().err
    assert "--text-column" in err and "a.jsonl" in err and "Traceback" not in err
    assert _prepare(tmp_path / "y", tmp_path / "a.jsonl", extra=("--text-column", "id")) == 2
    assert "--text-column" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    assert _prepare(tmp_path / "z", tmp_path / "bad.jsonl") == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "Traceback" not in err


def test_csv_rows_are_documents(tmp_path):
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([i, d] for i, d in enumerate(KEPT))
    assert _prepare(tmp_path / "out", tmp_path / "c.csv") == 0
    _check_tokens(tmp_path / "out", KEPT)


def test_directory_input_reads_its_files(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": KEPT[:2]}), d / "part-0.parquet")
    pq.write_table(pa.table({"text": KEPT[2:]}), d / "sub" / "part-1.parquet")
    (d / "_SUCCESS").write_text("")
    (d / ".part-0.parquet.crc").write_bytes(b"\0\1")
    assert _prepare(tmp_path / "out", d) == 0
    _check_tokens(tmp_path / "out", KEPT)


def test_a_pattern_matching_nothing_is_named(tmp_path, capsys):
    pq.write_table(pa.table({"text": KEPT}), tmp_path / "a.parquet")
    assert _prepare(tmp_path / "out", tmp_path / "a.parquet", tmp_path / "typo-*.parquet") == 2
    err = capsys.readouterr().err
    assert "--input" in err and "typo-*.parquet" in err


def test_null_and_empty_rows_are_skipped_and_counted(tmp_path, capsys):
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "a.parquet")
    assert _prepare(tmp_path / "out", tmp_path / "a.parquet") == 0
    assert "2 empty or null skipped" in capsys.readouterr().out
    toks, meta = _check_tokens(tmp_path / "out", KEPT)
    assert meta["skipped_docs"] == 2
    assert not ((toks[1:] == EOS) & (toks[:-1] == EOS)).any()  # no empty document between two EOS


def test_nothing_to_write_is_an_error_not_an_empty_store(tmp_path, capsys):
    pq.write_table(pa.table({"text": KEPT}), tmp_path / "a.parquet")
    assert _prepare(tmp_path / "big", tmp_path / "a.parquet", seq_len=100_000) == 2
    err = capsys.readouterr().err
    assert "--seq-len" in err and "Traceback" not in err
    assert not (tmp_path / "big" / "manifest.json").exists()
    pq.write_table(pa.table({"text": pa.array(["", None], pa.string())}), tmp_path / "e.parquet")
    assert _prepare(tmp_path / "empty", tmp_path / "e.parquet") == 2
    assert "--text-column" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "manifest.json").exists()


def test_text_files_gzip_invalid_utf8_and_rerun_reuses_work(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("first document")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("second, gzip'd")
    (tmp_path / "c.txt").write_bytes(b"ok \xff bad")
    (tmp_path / "d.txt").write_text("")
    out = tmp_path / "out"
    assert _prepare(out, *(tmp_path / n for n in ("a.txt", "b.txt.gz", "c.txt", "d.txt")), seq_len=4) == 0
    err = capsys.readouterr().err
    assert "c.txt" in err and "UTF-8" in err and "b.txt.gz" not in err
    toks, meta = _check_tokens(out, ["first document", "second, gzip'd", "ok \ufffd bad"])
    assert meta["skipped_docs"] == 1
    before = sorted(os.listdir(f"{out}.work"))
    assert _prepare(out, *(tmp_path / n for n in ("a.txt", "b.txt.gz", "c.txt", "d.txt")), seq_len=4,
                    extra=("--overwrite",)) == 0
    assert sorted(os.listdir(f"{out}.work")) == before  # the same partitions, reused


def test_existing_store_refused_before_any_work(tmp_path, capsys):
    pq.write_table(pa.table({"text": KEPT}), tmp_path / "a.parquet")
    assert _prepare(tmp_path / "out", tmp_path / "a.parquet") == 0
    work = tmp_path / "w2"
    capsys.readouterr()
    assert _prepare(tmp_path / "out", tmp_path / "a.parquet", seq_len=8, extra=("--work-dir", str(work))) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err
    assert not work.exists() or not any(p.name.startswith("tok-") for p in work.iterdir())


def test_unwritable_output_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """(Run as root the permission bits do not bind, so os.access and mkdir are made to say no.)"""
    pq.write_table(pa.table({"text": KEPT}), tmp_path / "a.parquet")
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access, real_mkdir = os.access, os.mkdir

    def access(path, mode, **kw):
        return False if str(path).startswith(str(ro)) and mode & os.W_OK else real_access(path, mode, **kw)

    def mkdir(path, *a, **kw):
        if str(path).startswith(str(ro)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "mkdir", mkdir)
    work = tmp_path / "work"
    for out in (ro, ro / "sub"):
        assert _prepare(out, tmp_path / "a.parquet", extra=("--work-dir", str(work))) == 2
        err = capsys.readouterr().err
        assert "argument out" in err and "permission denied" in err and "Traceback" not in err
        assert not work.exists() or not any(p.name.startswith("tok-") for p in work.iterdir())
    assert _prepare(tmp_path / "ok", tmp_path / "a.parquet", extra=("--work-dir", str(ro / "w"))) == 2
    assert "argument --work-dir" in capsys.readouterr().err


def test_interrupt_leaves_no_temp_files_and_rerun_resumes(tmp_path, capsys, monkeypatch):
    pq.write_table(pa.table({"text": KEPT * 50}), tmp_path / "a.parquet")
    real_save = np.save

    def save(f, arr, *a, **kw):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", save)
    out = tmp_path / "out"
    assert main(["data", "prepare", str(out), "--input", str(tmp_path / "a.parquet"), "--seq-len", "16",
                 "--partitions", "2", "--executor", "inline", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "rerun" in err and "Traceback" not in err
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(np, "save", real_save)
    assert main(["data", "prepare", str(out), "--input", str(tmp_path / "a.parquet"), "--seq-len", "16",
                 "--partitions", "2", "--executor", "inline", "--quiet"]) == 0
    _check_tokens(out, KEPT * 50)


def test_write_shows_progress(tmp_path, capsys):
    pq.write_table(pa.table({"text": KEPT * 20}), tmp_path / "a.parquet")
    assert main(["data", "prepare", str(tmp_path / "out"), "--input", str(tmp_path / "a.parquet"), "--seq-len",
                 "8", "--partitions", "1", "--executor", "inline"]) == 0
    assert "write:" in capsys.readouterr().err


def test_import_of_a_file_that_is_not_array_record(tmp_path, capsys):
    pq.write_table(pa.table({"text": KEPT}), tmp_path / "a.parquet")
    assert main(["data", "import", str(tmp_path / "a.parquet"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "argument src" in err and "a.parquet" in err and "Traceback" not in err


def test_text_column_of_another_type_reads_cleanly(tmp_path, capsys):
    pq.write_table(pa.table({"text": KEPT, "id": list(range(len(KEPT)))}), tmp_path / "a.parquet")
    assert _prepare(tmp_path / "out", tmp_path / "a.parquet", extra=("--text-column", "id")) == 2
    err = capsys.readouterr().err
    assert "BIGINT" in err and err.count("got") == 1


@pytest.mark.parametrize("bad", ["0", "-3"])
def test_seq_len_below_one(tmp_path, capsys, bad):
    pq.write_table(pa.table({"text": KEPT}), tmp_path / "a.parquet")
    assert _prepare(tmp_path / "out", tmp_path / "a.parquet", seq_len=bad) == 2
    assert "--seq-len" in capsys.readouterr().err
