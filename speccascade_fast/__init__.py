"""speccascade_fast: speculative cascades (Narasimhan et al., ICLR 2025), exact and fast."""
from .engine import GenerateOutput, generate
from .ragged import verify_ragged
from .rules import ALPHA_RANGES, RULES
from .sampling import sample
from .static_engine import Engine
from .types import VerifyOutput
from .verify import target_distribution, verify

__all__ = [
    "ALPHA_RANGES", "RULES", "Engine", "GenerateOutput", "VerifyOutput", "generate", "sample",
    "target_distribution", "verify", "verify_ragged",
]
__version__ = "0.1.0"
