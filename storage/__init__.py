"""Postgres: migrations, the ledger, checkpoints, and the xid snapshot fence."""
