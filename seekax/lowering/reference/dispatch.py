"""Numpy reference of DeepEP's dispatch/combine semantics over a whole EP group (the test oracle).

Global view: rank r holds x[r] [T, H], topk_idx[r] [T, K] (global expert ids, -1 = unselected) and
topk_weights[r] [T, K]; expert e lives on rank e // (E / P). num_tokens[r] (default T) is rank r's own
token count: its rows from num_tokens[r] on are ignored. Written as plain loops over ranks and tokens,
independent of the JAX implementation's index arithmetic.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def dispatch_layout(topk_idx: np.ndarray, num_experts: int, ep_size: int):
    """DeepEP's get_dispatch_layout for one rank. topk_idx: [T, K] ->
    (num_tokens_per_rank [P], num_tokens_per_expert [E], is_token_in_rank [T, P] bool)."""
    topk_idx = np.asarray(topk_idx)
    per_rank = num_experts // ep_size
    t = topk_idx.shape[0]
    per_expert = np.zeros(num_experts, np.int64)
    in_rank = np.zeros((t, ep_size), bool)
    for i in range(t):
        for e in topk_idx[i]:
            if e < 0:
                continue
            per_expert[e] += 1
            in_rank[i, e // per_rank] = True
    return in_rank.sum(0), per_expert, in_rank


def _counts(num_tokens, p: int, t: int) -> list[int]:
    return [t] * p if num_tokens is None else [int(n) for n in np.asarray(num_tokens).reshape(p)]


@dataclasses.dataclass
class RankRecv:
    """What one destination rank receives in the high-throughput (normal) mode."""

    x: np.ndarray             # [N, H], grouped by source rank ascending, source order kept
    topk_idx: np.ndarray | None      # [N, K] local expert ids, -1 where the expert is not on this rank
    topk_weights: np.ndarray | None  # [N, K] weights, 0 where not local
    tokens_per_expert: np.ndarray | None  # [E_local] received (token, local expert) pairs, aligned up
    src: list                 # [(source rank, source token)] per received row


def dispatch(x, topk_idx, topk_weights, num_experts: int, expert_alignment: int = 1,
             num_tokens=None) -> list[RankRecv]:
    """x: [P, T, H], topk_idx/topk_weights: [P, T, K] -> per destination rank, one copy per (token, rank)."""
    x, topk_idx, topk_weights = (np.asarray(a) for a in (x, topk_idx, topk_weights))
    p, t, k = topk_idx.shape
    n_tok = _counts(num_tokens, p, t)
    e_local = num_experts // p
    out = []
    for d in range(p):
        lo, hi = d * e_local, (d + 1) * e_local
        rows, ids, ws, src = [], [], [], []
        for s in range(p):
            for i in range(n_tok[s]):
                sel = [(lo <= e < hi) for e in topk_idx[s, i]]
                if not any(sel):
                    continue
                rows.append(x[s, i])
                ids.append([e - lo if ok else -1 for e, ok in zip(topk_idx[s, i], sel)])
                ws.append([w if ok else 0.0 for w, ok in zip(topk_weights[s, i], sel)])
                src.append((s, i))
        ids_arr = np.array(ids, np.int64).reshape(-1, k)
        counts = np.array([(ids_arr == j).sum() for j in range(e_local)], np.int64)
        counts = -(-counts // expert_alignment) * expert_alignment
        out.append(RankRecv(x=np.array(rows).reshape(-1, x.shape[2]), topk_idx=ids_arr,
                            topk_weights=np.array(ws, np.float64).reshape(-1, k),
                            tokens_per_expert=counts, src=src))
    return out


def dispatch_by_rank(x, is_token_in_rank, num_tokens=None) -> list[RankRecv]:
    """Dispatch without top-k. x: [P, T, H], is_token_in_rank: [P, T, P] bool (source, token, destination)
    -> per destination rank, one copy of every token marked for it, source rank ascending, source order."""
    x, mask = np.asarray(x), np.asarray(is_token_in_rank, bool)
    p, t = mask.shape[:2]
    n_tok = _counts(num_tokens, p, t)
    out = []
    for d in range(p):
        src = [(s, i) for s in range(p) for i in range(n_tok[s]) if mask[s, i, d]]
        rows = np.array([x[s, i] for s, i in src]).reshape(-1, x.shape[2])
        out.append(RankRecv(x=rows, topk_idx=None, topk_weights=None, tokens_per_expert=None, src=src))
    return out


def combine(ys: list, recv: list[RankRecv], num_tokens: int, weighted: bool = False) -> np.ndarray:
    """ys[d]: [N_d, H] per destination (one row per received copy) -> [P, T, H] in float64: the sum of each
    token's copies at its source position; weighted scales each copy by the sum of its local weights."""
    p = len(recv)
    h = ys[0].shape[-1] if len(ys) else 0
    out = np.zeros((p, num_tokens, h), np.float64)
    for d in range(p):
        for row, (s, i) in enumerate(recv[d].src):
            scale = recv[d].topk_weights[row].sum() if weighted else 1.0
            out[s, i] += scale * np.asarray(ys[d][row], np.float64)
    return out


def combine_weights(ws: list, recv: list[RankRecv], num_tokens: int) -> np.ndarray:
    """DeepEP's combined_topk_weights. ws[d]: [N_d, K] per received row -> [P, T, K] float64, each token's
    rows summed at its source position (zeros for tokens that sent nothing)."""
    return combine(ws, recv, num_tokens)


@dataclasses.dataclass
class RankRecvLL:
    """What one rank receives in the low-latency mode: one copy per (token, selected local expert)."""

    x: np.ndarray          # [E_local, P * M, H]; rows [0, count) valid per expert, source rank ascending
    counts: np.ndarray     # [E_local]
    src: list              # per local expert: [(source rank, source token, k)] per valid row


def ll_dispatch(x, topk_idx, num_experts: int, max_tokens_per_rank: int, num_tokens=None) -> list[RankRecvLL]:
    x, topk_idx = np.asarray(x), np.asarray(topk_idx)
    p, t, k = topk_idx.shape
    n_tok = _counts(num_tokens, p, t)
    e_local, m = num_experts // p, max_tokens_per_rank
    out = []
    for d in range(p):
        buf = np.zeros((e_local, p * m, x.shape[2]), x.dtype)
        counts = np.zeros(e_local, np.int64)
        src = [[] for _ in range(e_local)]
        for le in range(e_local):
            e = d * e_local + le
            for s in range(p):
                for i in range(n_tok[s]):
                    for j in range(k):
                        if topk_idx[s, i, j] == e:
                            buf[le, counts[le]] = x[s, i]
                            counts[le] += 1
                            src[le].append((s, i, j))
        out.append(RankRecvLL(x=buf, counts=counts, src=src))
    return out


def ll_combine(ys: list, recv: list[RankRecvLL], topk_weights, weighted: bool = True) -> np.ndarray:
    """ys[d]: [E_local, P * M, H] -> [P, T, H] float64: sum over k of weight[t, k] * expert output."""
    topk_weights = np.asarray(topk_weights, np.float64)
    p, t, _ = topk_weights.shape
    out = np.zeros((p, t, ys[0].shape[-1]), np.float64)
    for d in range(p):
        for le, rows in enumerate(recv[d].src):
            for row, (s, i, j) in enumerate(rows):
                w = topk_weights[s, i, j] if weighted else 1.0
                out[s, i] += w * np.asarray(ys[d][le, row], np.float64)
    return out


def ll_combine_weights(ws: list, recv: list[RankRecvLL], num_tokens: int, top_k: int) -> np.ndarray:
    """ws[d]: [E_local, P * M] one weight per received copy -> [P, T, K] float64: each copy's weight at its
    source slot (t, k); zeros for slots that sent no copy."""
    p = len(recv)
    out = np.zeros((p, num_tokens, top_k), np.float64)
    for d in range(p):
        for le, rows in enumerate(recv[d].src):
            for row, (s, i, j) in enumerate(rows):
                out[s, i, j] = ws[d][le, row]
    return out
