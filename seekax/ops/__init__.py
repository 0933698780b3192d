"""Public jit-able ops: validate once, choose a config, run the Mosaic GPU kernel or the XLA reference.

One module per op family: `matmul` (bf16 GEMM), `fp8` (DeepGEMM), `mla` (FlashMLA), `ep` (DeepEP),
`replica_routing` (EPLB's replica choice). Every op takes `backend="auto"|"mosaic"|"interpret"|"xla"`.
"""

from seekax.ops.ep import Dispatched as Dispatched
from seekax.ops.ep import DispatchHandle as DispatchHandle
from seekax.ops.ep import dispatch_layout as dispatch_layout
from seekax.ops.ep import ep_combine as ep_combine
from seekax.ops.ep import ep_dispatch as ep_dispatch
from seekax.ops.fp8 import dequantize_fp8 as dequantize_fp8
from seekax.ops.fp8 import fp8_gemm_nt as fp8_gemm_nt
from seekax.ops.fp8 import fp8_linear as fp8_linear
from seekax.ops.fp8 import grouped_fp8_linear as grouped_fp8_linear
from seekax.ops.fp8 import k_grouped_fp8_gemm_tn_contiguous as k_grouped_fp8_gemm_tn_contiguous
from seekax.ops.fp8 import m_grouped_fp8_gemm_nt_contiguous as m_grouped_fp8_gemm_nt_contiguous
from seekax.ops.fp8 import m_grouped_fp8_gemm_nt_masked as m_grouped_fp8_gemm_nt_masked
from seekax.ops.fp8 import quantize_fp8 as quantize_fp8
from seekax.ops.matmul import matmul_nt as matmul_nt
from seekax.ops.mla import MlaMetadata as MlaMetadata
from seekax.ops.mla import mla_decode as mla_decode
from seekax.ops.mla import mla_decode_fp8 as mla_decode_fp8
from seekax.ops.mla import mla_decode_sparse as mla_decode_sparse
from seekax.ops.mla import mla_decode_sparse_fp8 as mla_decode_sparse_fp8
from seekax.ops.mla import mla_metadata as mla_metadata
from seekax.ops.replica_routing import route_to_replicas as route_to_replicas

__all__ = ["DispatchHandle", "Dispatched", "MlaMetadata", "dequantize_fp8", "dispatch_layout", "ep_combine",
           "ep_dispatch", "fp8_gemm_nt", "fp8_linear", "grouped_fp8_linear", "k_grouped_fp8_gemm_tn_contiguous",
           "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked", "matmul_nt", "mla_decode",
           "mla_decode_fp8", "mla_decode_sparse", "mla_decode_sparse_fp8", "mla_metadata", "quantize_fp8",
           "route_to_replicas"]
