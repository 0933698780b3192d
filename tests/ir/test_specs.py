"""Kernel specs: validated at construction with errors naming the field; cost model; config cache."""

import json

import pytest

from seekax.ir import (H100, H200, ConfigCache, DispatchSpec, GemmSpec, GemmTileConfig, GroupedGemmSpec,
                       MlaDecodeSpec, SharedMemoryBudgetExceeded, choose_gemm_config, get_device)


@pytest.mark.parametrize("kwargs, field", [
    (dict(m=-1, n=128, k=128), "m"),
    (dict(m=64, n=0, k=128), "n"),
    (dict(m=64, n=128, k=1.5), "k"),
    (dict(m=64, n=128, k=128, a_dtype="int8"), "a_dtype"),
    (dict(m=64, n=128, k=128, out_dtype="float8_e4m3fn"), "out_dtype"),
    (dict(m=64, n=128, k=128, a_dtype="float8_e4m3fn"), "b_dtype"),
    (dict(m=64, n=128, k=128, a_dtype="float8_e4m3fn", b_dtype="float8_e4m3fn"), "a_scale"),
    (dict(m=64, n=128, k=128, a_dtype="float8_e4m3fn", b_dtype="float8_e4m3fn", a_scale=(1, 128),
          b_scale=(128, 128), layout="nn"), "layout"),
    (dict(m=64, n=128, k=128, a_scale=(1, 128)), "a_scale"),
])
def test_gemm_spec_rejects_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        GemmSpec(**kwargs)


def test_gemm_spec_cost_model():
    s = GemmSpec(m=4096, n=7168, k=2048, a_dtype="float8_e4m3fn", b_dtype="float8_e4m3fn",
                 a_scale=(1, 128), b_scale=(128, 128))
    assert s.flops() == 2 * 4096 * 7168 * 2048
    scales = 4 * (4096 * 16 + 56 * 16)
    assert s.min_bytes() == 4096 * 2048 + 7168 * 2048 + 4096 * 7168 * 2 + scales
    # Large FP8 GEMM is compute-bound: the floor is flops / fp8 peak.
    assert s.floor_seconds(H200) == pytest.approx(s.flops() / H200.fp8_flops)
    small = GemmSpec(m=64, n=7168, k=2048)
    assert small.floor_seconds(H200) == pytest.approx(small.min_bytes() / H200.hbm_bandwidth)
    assert H200.hbm_bandwidth == 4.3e12 and H100.hbm_bandwidth == 3.35e12
    assert get_device("NVIDIA H200") is H200
    with pytest.raises(ValueError, match="device="):
        get_device("tpu")


@pytest.mark.parametrize("cls, kwargs, field", [
    (GroupedGemmSpec, dict(num_groups=0, m=128, n=128, k=128), "num_groups"),
    (GroupedGemmSpec, dict(num_groups=4, m=128, n=128, k=128, layout="ragged"), "layout"),
    (GroupedGemmSpec, dict(num_groups=4, m=128, n=128, k=128, layout="masked", expected_m=129), "expected_m"),
    (MlaDecodeSpec, dict(batch=0, seq_len=64), "batch"),
    (MlaDecodeSpec, dict(batch=1, seq_len=-3), "seq_len"),
    (MlaDecodeSpec, dict(batch=1, seq_len=64, qk_dim=500), "qk_dim"),
    (MlaDecodeSpec, dict(batch=1, seq_len=64, v_dim=640), "v_dim"),
    (MlaDecodeSpec, dict(batch=1, seq_len=64, kv_dtype="int4"), "kv_dtype"),
    (DispatchSpec, dict(tokens=8, hidden=64, num_experts=10, top_k=2, ep_size=4), "num_experts"),
    (DispatchSpec, dict(tokens=8, hidden=64, num_experts=8, top_k=9, ep_size=4), "top_k"),
])
def test_other_specs_reject_bad_fields(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        cls(**kwargs)


def test_other_spec_costs():
    g = GroupedGemmSpec(num_groups=4, m=64, n=4096, k=7168, layout="masked", expected_m=32)
    assert g.flops() == 2 * 4 * 32 * 4096 * 7168
    mla = MlaDecodeSpec(batch=128, seq_len=4096, q_heads=128)
    assert mla.flops() == 2 * 128 * 128 * 4096 * (576 + 512)
    assert mla.min_bytes() > 128 * 4096 * 576 * 2  # at least the whole KV cache once
    fp8 = MlaDecodeSpec(batch=128, seq_len=4096, q_heads=128, kv_dtype="float8_e4m3fn")
    assert fp8.kv_bytes_per_token() == 512 + 4 * 4 + 64 * 2 == 656   # V3.2: e4m3 latent, f32 scales, bf16 rope
    assert mla.min_bytes() - fp8.min_bytes() == 128 * 4096 * (1152 - 656)
    d = DispatchSpec(tokens=4096, hidden=7168, num_experts=256, top_k=8, ep_size=8, dtype="float8_e4m3fn")
    assert d.payload_bytes_per_token() == 7168 + 4 * 56
    assert d.experts_per_rank == 32


def test_tile_config_rules_and_smem():
    with pytest.raises(ValueError, match="^block_m="):
        GemmTileConfig(block_m=96)
    with pytest.raises(ValueError, match="^stages="):
        GemmTileConfig(stages=1)
    with pytest.raises(ValueError, match="^block_n="):
        GemmTileConfig(block_n=512)
    big = GemmTileConfig(block_m=128, block_n=256, block_k=64, stages=6)
    with pytest.raises(SharedMemoryBudgetExceeded, match="227 KiB"):
        big.check_smem("bfloat16", "bfloat16")
    cfg = choose_gemm_config(1024, 1024, 1024, "bfloat16")
    assert cfg.smem_bytes("bfloat16", "bfloat16") <= 227 * 1024
    assert GemmTileConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_cache_round_trip(tmp_path):
    path = tmp_path / "sub" / "cache.json"
    cache = ConfigCache(path)
    spec = GemmSpec(m=128, n=256, k=512)
    assert cache.get(spec.key(), "H200", "0.11.2") is None
    cache.put(spec.key(), "H200", "0.11.2", GemmTileConfig().to_dict(), seconds=1e-3)
    assert ConfigCache(path).get(spec.key(), "H200", "0.11.2") == GemmTileConfig().to_dict()
    assert cache.get(spec.key(), "H200", "0.12.0") is None  # jax version is part of the key
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    path.write_text("{ torn")
    assert ConfigCache(path).get(spec.key(), "H200", "0.11.2") is None  # corrupt file reads as empty
