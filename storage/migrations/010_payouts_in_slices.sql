-- A payout pays its beneficiaries in slices, one transaction each, in
-- (beneficiary, currency) order (Ledger.pay_payout_slice). One transaction
-- over every approved entry held its locks for 23 to 25 s over a million
-- entries here; over 3.5 million, its statement marking them paid ran past
-- the pool's 60 s command timeout, so it failed on every retry.
-- paid_through is the last key a committed slice took; completed_at is set
-- by the slice that found nothing after it. A payout cut short is finished
-- by sending it again.
ALTER TABLE payouts
    ADD COLUMN paid_through_beneficiary text NOT NULL DEFAULT '',
    ADD COLUMN paid_through_currency char(3) NOT NULL DEFAULT '',
    ADD COLUMN completed_at timestamptz;
-- Each payout made before this migration was paid whole, in one transaction.
UPDATE payouts SET completed_at = created_at;

-- A slice's beneficiaries, and then their approved entries, are one range of
-- this index. It serves every lookup the index it replaces did.
CREATE INDEX commission_ledger_approved_key_idx ON commission_ledger (beneficiary_id, currency)
    WHERE status = 'approved';
DROP INDEX commission_ledger_approved_idx;
