-- A user's referrals in user id order straight from the index: the network
-- graph (Ledger.network_graph) reads each level's first N children of each
-- node with it, so its work is bounded by N, not by the size of the network
-- below (the top of a viral network is most of it). It serves every lookup
-- by referrer that the index it replaces did.
CREATE INDEX users_referrer_user_idx ON users (referrer_id, user_id);
DROP INDEX users_referrer_idx;
