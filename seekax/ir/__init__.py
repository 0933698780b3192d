"""What to compute: kernel specs, tile configs, device ceilings, the schedule IR and expert placement.
Depends on nothing else in seekax."""

from seekax.ir.config_cache import ConfigCache as ConfigCache
from seekax.ir.device import DEVICES as DEVICES
from seekax.ir.device import H100 as H100
from seekax.ir.device import H200 as H200
from seekax.ir.device import DeviceSpec as DeviceSpec
from seekax.ir.device import get_device as get_device
from seekax.ir.dispatch import DispatchSpec as DispatchSpec
from seekax.ir.gemm import GemmSpec as GemmSpec
from seekax.ir.gemm import GroupedGemmSpec as GroupedGemmSpec
from seekax.ir.mla import MlaDecodeSpec as MlaDecodeSpec
from seekax.ir.tiling import GemmTileConfig as GemmTileConfig
from seekax.ir.tiling import SharedMemoryBudgetExceeded as SharedMemoryBudgetExceeded
from seekax.ir.tiling import choose_gemm_config as choose_gemm_config
from seekax.ir.fp8_tiling import Fp8SwapAbConfig as Fp8SwapAbConfig
from seekax.ir.fp8_tiling import Fp8TileConfig as Fp8TileConfig
from seekax.ir.fp8_tiling import choose_fp8_config as choose_fp8_config
from seekax.ir.placement import ExpertPlacement as ExpertPlacement
from seekax.ir.schedule import UNIT_COSTS as UNIT_COSTS
from seekax.ir.schedule import Op as Op
from seekax.ir.schedule import Schedule as Schedule
from seekax.ir.schedule import SimResult as SimResult
from seekax.ir.schedule_costs import CommCosts as CommCosts
from seekax.ir.schedule_costs import SubStepCost as SubStepCost

__all__ = ["CommCosts", "ConfigCache", "DEVICES", "DeviceSpec", "DispatchSpec", "ExpertPlacement", "Fp8SwapAbConfig",
           "Fp8TileConfig",
           "GemmSpec", "GemmTileConfig", "GroupedGemmSpec", "H100", "H200", "MlaDecodeSpec", "Op", "Schedule",
           "SharedMemoryBudgetExceeded", "SimResult", "SubStepCost", "UNIT_COSTS", "choose_fp8_config",
           "choose_gemm_config", "get_device"]
