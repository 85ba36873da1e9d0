from dailydoco.protocol import REFERRAL_CODE_ALPHABET, new_referral_code, normalize_referral_code


def test_codes_use_only_the_unambiguous_alphabet():
    for _ in range(1_000):
        code = new_referral_code()
        assert len(code) == 8 and set(code) <= set(REFERRAL_CODE_ALPHABET)
    assert not set("01OIL U") & set(REFERRAL_CODE_ALPHABET)


def test_normalisation_folds_width_case_and_separators():
    assert normalize_referral_code("ab3d-ef4g") == "AB3DEF4G"
    assert normalize_referral_code("ＡＢ３Ｄ ＥＦ４Ｇ") == "AB3DEF4G"  # full-width, NFKC


def test_malformed_codes_are_refused_not_guessed():
    for raw in ("", "AB3DEF4", "AB3DEF4GH", "AB3DEF4O", "AB3DEF4İ", "AB3DEF4\u0000"):
        assert normalize_referral_code(raw) is None
