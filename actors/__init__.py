"""Ray actors that own the engine's state, each a thin shell over a plain class.

- UserShardActor (user_shard.py) over ShardState (shard_core.py): users, network
  statistics and balances of a set of virtual shards.
- CommissionChainActor (commission_chain.py) over CommissionEngine
  (commission_core.py): purchases to durable commission entries.
- SupervisorActor (supervisor.py): creates, watches and restarts them.
- Live events: each writing actor publishes the outbox rows it commits
  (live_publisher.py); OutboxRelayActor (outbox_relay.py) publishes those
  left behind.
"""
