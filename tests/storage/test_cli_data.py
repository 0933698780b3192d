"""`seekax data prepare|inspect|verify` through the CLI entry point."""

import json

import numpy as np

from seekax.cli.main import main
from seekax.storage.sample_store import SampleStore
from seekax.storage.tokens import EOS


def test_prepare_inspect_verify_synthetic(tmp_path, capsys):
    out = str(tmp_path / "store")
    rc = main(["data", "prepare", out, "--synthetic", "300", "--seq-len", "128", "--partitions", "3",
               "--executor", "inline", "--dedupe", "--quiet"])
    assert rc == 0
    assert "sequences x 128 tokens (300 documents" in capsys.readouterr().out
    with SampleStore(out, verify=True) as s:
        toks = s.read(np.arange(len(s)))
        assert toks.shape[1] == 128 and (toks == EOS).sum() >= 250
    assert main(["data", "inspect", out, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "tokens" and summary["seq_len"] == 128 and summary["metadata"]["docs"] == 300
    assert main(["data", "inspect", out, "--show", "1"]) == 0
    assert "[0] '" in capsys.readouterr().out
    assert main(["data", "verify", out, "--quiet"]) == 0
    # rerun with overwrite: finished partitions are reused, the same store comes out
    before = (tmp_path / "store" / "shard-00000.data").read_bytes()
    assert main(["data", "prepare", out, "--synthetic", "300", "--seq-len", "128", "--partitions", "3",
                 "--executor", "inline", "--dedupe", "--quiet", "--overwrite"]) == 0
    assert (tmp_path / "store" / "shard-00000.data").read_bytes() == before
    # corruption: a flipped byte fails verify with exit 1 and names the shard
    p = tmp_path / "store" / "shard-00000.data"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["data", "verify", out, "--quiet"]) == 1
    assert "shard-00000: data checksum" in capsys.readouterr().err


def test_prepare_from_text_files_and_errors(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 20)
    out = str(tmp_path / "store")
    assert main(["data", "prepare", out, "--input", str(tmp_path / "doc*.txt"), "--seq-len", "32",
                 "--partitions", "1", "--executor", "inline", "--quiet"]) == 0
    with SampleStore(out) as s:
        assert s.manifest["metadata"]["docs"] == 3
    assert main(["data", "prepare", out, "--synthetic", "10", "--quiet", "--executor", "inline"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "verify", str(tmp_path / "nothing")]) == 2
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "shard-00000.data").write_bytes(b"x")
    assert main(["data", "verify", str(tmp_path / "half")]) == 1
    assert "incomplete" in capsys.readouterr().err


def test_prepare_with_a_tokenizer_json(tmp_path, capsys):
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    text = "the expert routes each token to a latent cache page. " * 20
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "doc.txt").write_text(text)
    out = str(tmp_path / "store")
    assert main(["data", "prepare", out, "--input", str(tmp_path / "doc.txt"), "--seq-len", "16", "--partitions",
                 "1", "--executor", "inline", "--quiet", "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    with SampleStore(out) as s:
        ident = s.manifest["metadata"]["tokenizer"]
        assert ident["kind"] == "hf" and ident["eos_id"] == tok.token_to_id("</s>")
        assert s.read(np.arange(len(s))).reshape(-1)[:8].tolist() == tok.encode(text).ids[:8]
    capsys.readouterr()
    assert main(["data", "prepare", str(tmp_path / "s2"), "--input", str(tmp_path / "doc.txt"), "--executor",
                 "inline", "--quiet", "--tokenizer", str(tmp_path / "tokenizer.json"), "--eos-token", "<eot>"]) == 2
    assert "--eos-token" in capsys.readouterr().err


def test_export_import_array_record(tmp_path, capsys):
    from seekax.storage.sample_store import write_token_store

    seqs = np.arange(300 * 8, dtype=np.int32).reshape(300, 8)
    write_token_store(tmp_path / "s", seqs)
    ar = str(tmp_path / "x.array_record")
    assert main(["data", "export", str(tmp_path / "s"), ar, "--shards", "2"]) == 0
    assert "2 ArrayRecord file(s)" in capsys.readouterr().out
    assert main(["data", "import", ar + "-*", str(tmp_path / "back")]) == 0
    assert "300 tokens records" in capsys.readouterr().out
    with SampleStore(tmp_path / "back") as s:
        np.testing.assert_array_equal(s.read(np.arange(300)), seqs)
    assert main(["data", "export", str(tmp_path / "s"), ar, "--shards", "2"]) == 2  # exists: a usage error
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "export", str(tmp_path / "s"), ar, "--shards", "0", "--overwrite"]) == 2
    assert "--shards" in capsys.readouterr().err
    assert main(["data", "import", ar + "-00000-of-00002", str(tmp_path / "t"), "--kind", "tokens", "--dtype",
                 "int32", "--seq-len", "9"]) == 2
    assert "src" in capsys.readouterr().err
