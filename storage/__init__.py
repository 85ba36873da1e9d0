"""Postgres: migrations, the ledger and its partitions, checkpoints, and the xid snapshot fence."""
