-- A commissions page filtered by status (GET /v1/users/{id}/commissions?status=)
-- went down the index by (beneficiary, time), read each entry's status from
-- the table, and read through every monthly partition that held none of the
-- status asked: Postgres merges the months' scans, each of which must find
-- its first match or its end. For the top of a referral tree, whose entries
-- are most of the ledger, that is all of them. Probed with 2,000,000 entries
-- of one user over six months (session 52): a page of pending entries, the
-- newest, took 275 ms, of approved 268, of paid, refunded or reversed 56 to 63;
-- about 1.3 ms each now. With the status second in the key each scan starts at its
-- first match; a page of every status merges one scan a status
-- (Ledger.commissions_page). It replaces the index it extends, so a purchase's
-- rows are indexed as often as before: COPYing them cost 2 to 3 µs more
-- a purchase in a probe (54 against 52 µs, medians of six runs), for the
-- wider key.
CREATE INDEX commission_ledger_beneficiary_status_idx
    ON commission_ledger (beneficiary_id, status, created_at DESC, entry_id DESC);
DROP INDEX commission_ledger_beneficiary_idx;
