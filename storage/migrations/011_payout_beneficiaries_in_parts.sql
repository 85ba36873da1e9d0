-- A beneficiary with more approved entries than a payout slice takes
-- (PAYOUT_SLICE_ENTRIES) is paid over several slices, in parts
-- (Ledger._pay_part): its commissions in entry order, then its clawbacks,
-- each clawback only while the line stays above zero. Before, all of one
-- beneficiary's entries were one transaction: 200,000 took 3.4 s here, so
-- about 3.5 million would run past the pool's 60 s command timeout on every
-- retry, and the payout could never be made; the root of a viral network is
-- paid by nearly every purchase under it.
-- part_* name the key being paid in parts (null when none), which kind of
-- entry it is on, and the last entry paid.
ALTER TABLE payouts
    ADD COLUMN part_beneficiary text,
    ADD COLUMN part_currency char(3),
    ADD COLUMN part_clawbacks boolean NOT NULL DEFAULT false,
    ADD COLUMN part_after_entry bigint NOT NULL DEFAULT 0;

-- A part is a range of this index: one key's approved entries in entry
-- order. It serves every lookup the index it replaces did.
CREATE INDEX commission_ledger_approved_key_entry_idx ON commission_ledger (beneficiary_id, currency, entry_id)
    WHERE status = 'approved';
DROP INDEX commission_ledger_approved_key_idx;
