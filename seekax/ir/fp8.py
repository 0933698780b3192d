"""FP8 conventions every quantiser, spec and kernel shares (DeepGEMM, DeepEP, FlashMLA's V3.2 cache).

One e4m3 format, one 128-wide scale block, one scale rule: scale = max(amax, AMAX_FLOOR) / FP8_MAX per block,
so x ~= x_fp8 * scale. An all-zero block gets the finite scale AMAX_FLOOR / FP8_MAX (about 2.2e-7), quantises
to zeros and dequantises to exact zeros; no quantiser divides by zero or special-cases an empty block.
"""

from __future__ import annotations

import ml_dtypes

FP8_DTYPE = "float8_e4m3fn"                                       # the dtype name of every FP8 operand
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)     # 448.0, the largest finite e4m3fn value
SCALE_BLOCK = 128          # one float32 scale per 128 elements along K (and per 128 rows of a weight)
AMAX_FLOOR = 1e-4          # DeepGEMM's and DeepEP's clamp: the smallest amax a scale is computed from
ACT_BLOCK = (1, SCALE_BLOCK)                # activations: one scale per token and 128 channels
WEIGHT_BLOCK = (SCALE_BLOCK, SCALE_BLOCK)   # weights: one scale per 128 x 128 block
