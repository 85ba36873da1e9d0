"""Typed messages and pure rules; imports no I/O library (a test enforces it)."""

# Re-exported: callers import every message, error and rule from here.
from .messages import *  # noqa: F401,F403
from .money import (  # noqa: F401
    AMOUNT_MICROS_MAX,
    LEVEL_RATES_BP,
    LEVELS_MAX,
    proportional_reversal,
    split_commission,
)
from .problems import *  # noqa: F401,F403
from .referral_codes import REFERRAL_CODE_ALPHABET, new_referral_code, normalize_referral_code  # noqa: F401
