"""`seekax lower`: every stage prints, --check reports and fails clearly."""

import pytest

from seekax.lowering.inspect import kernel_report
from seekax.cli.main import main


def test_emit_mosaic_shows_wgmma(capsys):
    assert main(["lower", "matmul", "--m", "1024", "--n", "1024", "--k", "1024", "--dtype", "bfloat16",
                 "--emit", "mosaic"]) == 0
    out = capsys.readouterr().out
    assert "gpu.launch" in out and "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in out


@pytest.mark.parametrize("stage, needle", [("jaxpr", "wgmma"), ("stablehlo", "mosaic_gpu")])
def test_emit_other_stages(capsys, stage, needle):
    assert main(["lower", "matmul", "--m", "256", "--n", "256", "--k", "128", "--emit", stage]) == 0
    assert needle in capsys.readouterr().out


def test_check_passes_and_fails(capsys):
    assert main(["lower", "matmul", "--check"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["lower", "matmul", "--check", "--block-n", "256", "--stages", "6"]) == 1
    err = capsys.readouterr().err
    assert "shared memory" in err and "227 KiB" in err


@pytest.mark.parametrize("op", ["mla_decode", "mla_decode_fp8", "mla_decode_sparse",
                                "mla_decode_sparse_fp8"])
def test_check_mla_decode(capsys, op):
    assert main(["lower", op, "--batch", "8", "--seq-len", "1024", "--heads", "16", "--q-len", "2", "--check"]) == 0
    out = capsys.readouterr().out
    assert "OK (2 kernel(s) fit 227 KiB; wgmma in 1)" in out and "m64n256k16" in out


def test_kernel_report_rejects_non_kernel_text():
    with pytest.raises(ValueError, match="gpu.launch"):
        kernel_report("module {}")
