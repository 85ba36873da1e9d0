-- Token revocation: "sign out everywhere". A user's tokens issued at or
-- before revoked_before are refused, over HTTP and on open live sockets.
-- One row per user; a later revocation only moves the instant forward.
CREATE TABLE token_revocations (
    user_id text PRIMARY KEY,
    revoked_before timestamptz NOT NULL
);
