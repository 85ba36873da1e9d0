-- Live events: a transactional outbox and one event stream per user.
-- Each write that changes what a user sees appends that user's events to the
-- outbox in its own transaction; the relay (actors/outbox_relay.py) moves them
-- to NATS JetStream and deletes them.

-- The stream's epoch names this database's offset space: a client holding an
-- offset of another epoch (another database) cannot resume and reloads.
CREATE TABLE event_epoch (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch text NOT NULL
);
INSERT INTO event_epoch (epoch) VALUES (substr(md5(random()::text || clock_timestamp()::text), 1, 16));

-- The last offset given out per user. Writers lock a user's row to take the
-- next offsets, so one user's events commit in offset order.
CREATE TABLE event_streams (
    user_id text PRIMARY KEY,
    vshard smallint NOT NULL,
    last_seq bigint NOT NULL CHECK (last_seq >= 0),
    -- members at levels 1-7, counted here so a milestone is decided once, in
    -- the registration's own transaction
    network_size bigint NOT NULL DEFAULT 0 CHECK (network_size >= 0)
);
CREATE INDEX event_streams_vshard_idx ON event_streams (vshard);

-- One row per user per write: events with offsets first_seq, first_seq + 1, ...
CREATE TABLE outbox (
    outbox_id bigserial PRIMARY KEY,
    user_id text NOT NULL,
    first_seq bigint NOT NULL CHECK (first_seq >= 1),
    events bytea NOT NULL,  -- msgpack list of protocol.live events
    created_at timestamptz NOT NULL
);
