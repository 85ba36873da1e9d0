"""Referral codes: short, from an alphabet people cannot misread."""

from __future__ import annotations

import secrets
import unicodedata

# Crockford-style: no 0/O, 1/I/L, U (which reads as V), so a code read aloud or
# copied from a screenshot survives.
REFERRAL_CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"
REFERRAL_CODE_LENGTH = 8  # 30^8 ≈ 6.6e11 codes: collisions are rare and retried.


def new_referral_code() -> str:
    return "".join(secrets.choice(REFERRAL_CODE_ALPHABET) for _ in range(REFERRAL_CODE_LENGTH))


def normalize_referral_code(raw: str) -> str | None:
    """NFKC-normalise, upper-case and strip separators; None if not a code.

    NFKC folds full-width and other compatibility forms ("ＡＢＣ" → "ABC") so a
    code pasted from anywhere matches; anything outside the alphabet after
    that is rejected rather than guessed at.
    """
    folded = unicodedata.normalize("NFKC", raw).upper().replace("-", "").replace(" ", "")
    if len(folded) != REFERRAL_CODE_LENGTH:
        return None
    if any(ch not in REFERRAL_CODE_ALPHABET for ch in folded):
        return None
    return folded
