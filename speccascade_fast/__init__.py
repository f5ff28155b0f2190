"""speccascade_fast: speculative cascades (Narasimhan et al., ICLR 2025), exact and fast."""
from .config import DecodeConfig
from .engine import Engine
from .generation import generate
from .outputs import GenerateOutput
from .ragged import verify_ragged
from .rules import ALPHA_RANGES, RULES
from .sampling import sample
from .types import VerifyOutput
from .verify import target_distribution, verify

__all__ = [
    "ALPHA_RANGES", "RULES", "DecodeConfig", "Engine", "GenerateOutput", "VerifyOutput",
    "generate", "sample", "target_distribution", "verify", "verify_ragged",
]
__version__ = "0.1.0"
