"""Runtime: collectives and attention kernels as torch.library custom ops (namespace xdit)."""
from . import tokens  # noqa: F401
try:
    from . import attention  # noqa: F401
except ImportError:  # pragma: no cover - only while the module is being written
    pass
from . import pipefusion  # noqa: F401,E402
from . import symm_a2a  # noqa: F401,E402
from . import ce_a2a  # noqa: F401,E402
from . import fused_linear  # noqa: F401,E402
from . import flash_cute  # noqa: F401,E402
