-- Core ledger schema. Every row that feeds a shard's memory records the id of
-- the Postgres transaction that wrote it (xid, as bigint), so recovery can
-- tell exactly which writes a checkpoint already holds (storage/snapshots.py).
-- The high-volume tables get the xid from the writer (it is known from the
-- transaction's first statement) and index it with BRIN: xids grow with
-- insertion order, so the index stays tiny and almost free to maintain.

CREATE TABLE engine_clock (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    offset_us bigint NOT NULL DEFAULT 0 CHECK (offset_us >= 0)
);
INSERT INTO engine_clock DEFAULT VALUES;

CREATE TABLE users (
    user_id text PRIMARY KEY,
    referral_code text NOT NULL UNIQUE,
    referrer_id text REFERENCES users (user_id),
    -- Ancestors, level 1 (direct referrer) first. Fixed at registration, so a
    -- cycle cannot be built: a referrer always exists before its referrals.
    upline text[] NOT NULL CHECK (cardinality(upline) <= 7),
    vshard smallint NOT NULL,
    body_hash bytea NOT NULL,
    created_at timestamptz NOT NULL,
    xid bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
    CHECK (referrer_id IS DISTINCT FROM user_id),
    CHECK ((referrer_id IS NULL) = (cardinality(upline) = 0))
);
CREATE INDEX users_referrer_idx ON users (referrer_id);
CREATE INDEX users_vshard_idx ON users (vshard);
CREATE INDEX users_xid_idx ON users (xid);

CREATE TABLE transactions (
    -- The client's id is the idempotency key: a replay finds this row.
    transaction_id text PRIMARY KEY,
    user_id text NOT NULL REFERENCES users (user_id),
    amount_micros bigint NOT NULL CHECK (amount_micros > 0),
    currency char(3) NOT NULL,
    kind text NOT NULL CHECK (kind IN ('purchase', 'renewal')),
    body_hash bytea NOT NULL,
    house_micros bigint NOT NULL CHECK (house_micros >= 0),
    refunded_micros bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL,
    xid bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
    CHECK (refunded_micros BETWEEN 0 AND amount_micros)
);
CREATE INDEX transactions_xid_idx ON transactions USING brin (xid);
CREATE INDEX transactions_user_idx ON transactions (user_id);

CREATE TABLE refunds (
    refund_id text PRIMARY KEY,
    transaction_id text NOT NULL REFERENCES transactions (transaction_id),
    amount_micros bigint NOT NULL CHECK (amount_micros > 0),
    refunded_before_micros bigint NOT NULL CHECK (refunded_before_micros >= 0),
    house_reversal_micros bigint NOT NULL CHECK (house_reversal_micros >= 0),
    body_hash bytea NOT NULL,
    created_at timestamptz NOT NULL,
    xid bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint
);
CREATE INDEX refunds_xid_idx ON refunds (xid);
CREATE INDEX refunds_transaction_idx ON refunds (transaction_id);

-- Entry ids are drawn with a cache per session: unique, not gap-free; paging
-- orders by (created_at, entry_id), which is total either way.
CREATE SEQUENCE commission_entry_id_seq CACHE 1000;

CREATE TABLE commission_ledger (
    entry_id bigint NOT NULL DEFAULT nextval('commission_entry_id_seq'),
    transaction_id text NOT NULL,
    refund_id text,
    reverses_entry_id bigint,
    beneficiary_id text NOT NULL,
    vshard smallint NOT NULL,
    level smallint NOT NULL CHECK (level BETWEEN 1 AND 7),
    rate_bp integer NOT NULL,
    amount_micros bigint NOT NULL,
    currency char(3) NOT NULL,
    -- commission: what a purchase pays; refund: a reversal while the
    -- commission is unpaid (it moves with it); clawback: a reversal after
    -- payout, netted against the next one.
    kind text NOT NULL CHECK (kind IN ('commission', 'refund', 'clawback')),
    status text NOT NULL CHECK (status IN ('pending', 'approved', 'paid', 'refunded', 'reversed')),
    created_status text NOT NULL CHECK (created_status IN ('pending', 'approved')),
    created_at timestamptz NOT NULL,
    hold_until timestamptz NOT NULL,
    xid bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
    PRIMARY KEY (entry_id, created_at),
    CHECK ((kind = 'commission') = (amount_micros > 0)),
    CHECK ((kind = 'commission') = (refund_id IS NULL))
) PARTITION BY RANGE (created_at);
CREATE TABLE commission_ledger_default PARTITION OF commission_ledger DEFAULT;
CREATE INDEX commission_ledger_beneficiary_idx ON commission_ledger (beneficiary_id, created_at DESC, entry_id DESC);
CREATE INDEX commission_ledger_transaction_idx ON commission_ledger (transaction_id);
CREATE INDEX commission_ledger_pending_idx ON commission_ledger (hold_until) WHERE status = 'pending';
CREATE INDEX commission_ledger_approved_idx ON commission_ledger (beneficiary_id) WHERE status = 'approved';
CREATE INDEX commission_ledger_xid_idx ON commission_ledger USING brin (xid);

-- Every status change of a ledger entry, append-only: with the entries'
-- created_status it replays any bucket balance exactly.
CREATE TABLE ledger_transitions (
    transition_id bigserial PRIMARY KEY,
    entry_id bigint NOT NULL,
    beneficiary_id text NOT NULL,
    vshard smallint NOT NULL,
    currency char(3) NOT NULL,
    amount_micros bigint NOT NULL,
    from_status text NOT NULL,
    to_status text NOT NULL,
    payout_id text,
    created_at timestamptz NOT NULL,
    xid bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint
);
CREATE INDEX ledger_transitions_xid_idx ON ledger_transitions (xid);

CREATE TABLE payouts (
    payout_id text PRIMARY KEY,
    currency char(3),
    body_hash bytea NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE TABLE payout_lines (
    payout_id text NOT NULL REFERENCES payouts (payout_id),
    beneficiary_id text NOT NULL,
    currency char(3) NOT NULL,
    amount_micros bigint NOT NULL CHECK (amount_micros > 0),
    PRIMARY KEY (payout_id, beneficiary_id, currency)
);

-- The explicit house rounding account: what floor rounding kept back.
CREATE VIEW house_account AS
SELECT t.currency,
       sum(t.house_micros) - coalesce(sum(r.house_reversal_micros), 0) AS balance_micros
FROM transactions t
LEFT JOIN (SELECT transaction_id, sum(house_reversal_micros) AS house_reversal_micros
           FROM refunds GROUP BY transaction_id) r USING (transaction_id)
GROUP BY t.currency;

CREATE TABLE shard_checkpoints (
    vshard smallint PRIMARY KEY,
    snapshot text NOT NULL,
    state bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
