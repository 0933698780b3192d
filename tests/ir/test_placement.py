"""ExpertPlacement: validation on construction, helpers, JSON round trip."""

import json
import pathlib

import numpy as np
import pytest

from seekax.ir.placement import ExpertPlacement

CASES = pathlib.Path(__file__).resolve().parents[1] / "data" / "eplb_cases.jsonl"


def _reference_cases():
    with open(CASES) as f:
        return [json.loads(line) for line in f]


def _example() -> ExpertPlacement:
    # 1 layer, 3 experts, 4 slots: expert 0 twice.
    return ExpertPlacement(phy2log=[[0, 1, 0, 2]], log2phy=[[[0, 2], [1, -1], [3, -1]]], logcnt=[[2, 1, 1]])


def test_sizes_and_loads():
    p = _example()
    assert (p.num_layers, p.num_replicas, p.num_logical, p.max_replicas) == (1, 4, 3, 2)
    assert p.slots_per_gpu(2) == 2
    np.testing.assert_allclose(p.gpu_loads([[4.0, 1.0, 3.0]], 2), [[3.0, 5.0]])
    np.testing.assert_allclose(p.balance([[4.0, 1.0, 3.0]], 2), [5.0 / 4.0])
    assert not p.phy2log.flags.writeable


def test_reference_outputs_are_valid_placements_and_loads_match():
    for case in _reference_cases():
        for suffix in ("", "_stable_sort"):
            p = ExpertPlacement(phy2log=case["phy2log" + suffix], log2phy=case["log2phy" + suffix],
                                logcnt=case["logcnt" + suffix])
            loads = p.gpu_loads(case["weight"], case["num_gpus"])
            if suffix == "":
                np.testing.assert_allclose(loads, case["gpu_loads"], rtol=1e-5)
            np.testing.assert_allclose(p.balance(case["weight"], case["num_gpus"]),
                                       case["max_over_mean_gpu_load" + suffix], rtol=1e-5)


def test_identity_and_from_phy2log(rng):
    p = ExpertPlacement.identity(3, 8)
    assert np.array_equal(p.phy2log, np.tile(np.arange(8), (3, 1)))
    assert np.array_equal(p.log2phy[..., 0], p.phy2log) and p.max_replicas == 1
    q = ExpertPlacement.identity(2, 4, num_replicas=8)
    assert np.array_equal(q.logcnt, np.full((2, 4), 2))
    phy2log = np.stack([rng.permutation(np.concatenate([np.arange(16), rng.integers(0, 16, 8)])) for _ in range(4)])
    r = ExpertPlacement.from_phy2log(phy2log, 16)
    assert np.array_equal(r.logcnt, np.stack([np.bincount(row, minlength=16) for row in phy2log]))


def test_json_round_trip_and_tuple():
    p = ExpertPlacement.identity(2, 4, num_replicas=6)
    assert ExpertPlacement.from_json(p.to_json()) == p
    assert ExpertPlacement.from_tuple(p.to_tuple()) == p
    assert p.padded(5).max_replicas == 5 and p.padded(5).logcnt.tolist() == p.logcnt.tolist()
    assert p.layer(1) == ExpertPlacement.identity(1, 4, num_replicas=6)


@pytest.mark.parametrize("fields, match", [
    (dict(phy2log=[[0, 1, 0, 2]], log2phy=[[[0, 2], [1, -1], [3, -1]]], logcnt=[[1, 2, 1]]), "logcnt"),
    (dict(phy2log=[[0, 1, 0, 3]], log2phy=[[[0, 2], [1, -1], [3, -1]]], logcnt=[[2, 1, 1]]), "phy2log"),
    (dict(phy2log=[[0, 1, 0, 2]], log2phy=[[[0, 1], [1, -1], [3, -1]]], logcnt=[[2, 1, 1]]), "log2phy"),
    (dict(phy2log=[[0, 1, 0, 2]], log2phy=[[[0, 2], [1, 0], [3, -1]]], logcnt=[[2, 1, 1]]), "log2phy"),
    (dict(phy2log=[[0, 1, 0, 2]], log2phy=[[[0], [1], [3]]], logcnt=[[2, 1, 1]]), "log2phy.shape"),
    (dict(phy2log=[[0, 1, 0, 0]], log2phy=[[[0, 2, 3], [1, -1, -1], [-1, -1, -1]]], logcnt=[[3, 1, 0]]), "logcnt"),
    (dict(phy2log=[[0.0, 1.0]], log2phy=[[[0], [1]]], logcnt=[[1, 1]]), "phy2log.dtype"),
    (dict(phy2log=[0, 1], log2phy=[[[0], [1]]], logcnt=[[1, 1]]), "phy2log.shape"),
    (dict(phy2log=[[0, 1]], log2phy=[[[0], [1]]], logcnt=[[1, 1], [1, 1]]), "logcnt.shape"),
])
def test_bad_placements_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        ExpertPlacement(**fields)


def test_bad_helper_arguments():
    p = _example()
    with pytest.raises(ValueError, match="num_gpus"):
        p.slots_per_gpu(3)
    with pytest.raises(ValueError, match="weight.shape"):
        p.gpu_loads([[1.0, 2.0]], 2)
    with pytest.raises(ValueError, match="maxcnt"):
        p.padded(1)
