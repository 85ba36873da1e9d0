-- When an outbox row was written, by the database's own clock (the engine's
-- clock can be moved by tests). Its writer publishes a row the moment it
-- commits; the relay takes only rows left waiting past a grace period
-- (actors/live_publisher.py, actors/outbox_relay.py).
ALTER TABLE outbox ADD COLUMN written_at timestamptz NOT NULL DEFAULT clock_timestamp();
