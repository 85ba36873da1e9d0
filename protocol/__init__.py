"""Typed messages and pure rules; imports no I/O library (a test enforces it)."""

from .messages import *  # noqa: F401,F403
from .money import AMOUNT_MICROS_MAX, LEVEL_RATES_BP, LEVELS_MAX, proportional_reversal, split_commission
from .problems import *  # noqa: F401,F403
from .referral_codes import REFERRAL_CODE_ALPHABET, new_referral_code, normalize_referral_code
