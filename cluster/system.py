"""Starts and stops the whole engine: servers, Ray, actors, Serve."""

from __future__ import annotations

import asyncio
import os

import asyncpg

from .config import EngineConfig
from .embedded import EmbeddedServers

SERVE_APP_NAME = "dailydoco"


def _ray_env(config: EngineConfig) -> None:
    """Serve reads these at import, in every process Ray starts: set them first."""
    if config.haproxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    else:
        os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
        os.environ.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED", None)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


async def _migrate(postgres_url: str) -> list[str]:
    from dailydoco.storage.migrations import apply_migrations, ensure_ledger_partitions

    conn = await asyncpg.connect(postgres_url)
    try:
        applied = await apply_migrations(conn)
        await ensure_ledger_partitions(conn)
        return applied
    finally:
        await conn.close()


class EngineSystem:
    """`with EngineSystem(config) as system:` runs everything; `system.url` is the API."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.servers = EmbeddedServers(config.state_dir)
        self.url = f"http://{config.http_host}:{config.http_port}"
        self._ray_started_here = False

    def start(self) -> "EngineSystem":
        from dailydoco.serve.auth import load_or_create_secrets

        cfg = self.config
        self.postgres_url, self.nats_url, self.redis_url = self.servers.resolve(
            cfg.postgres_url, cfg.nats_url, cfg.redis_url)
        try:
            self.migrations_applied = asyncio.run(_migrate(self.postgres_url))
            self.secrets = load_or_create_secrets(cfg.state_dir)
            self._start_ray()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_ray(self) -> None:
        _ray_env(self.config)
        import ray
        from ray import serve

        from dailydoco.actors.refs import SUPERVISOR_NAME
        from dailydoco.actors.supervisor import SupervisorActor
        from dailydoco.serve.deployment import EngineIngress

        cfg = self.config
        if not ray.is_initialized():
            ray.init(address=cfg.ray_address, namespace=cfg.namespace, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            self._ray_started_here = cfg.ray_address is None
        self.supervisor = SupervisorActor.options(
            name=SUPERVISOR_NAME, namespace=cfg.namespace, lifetime="detached", get_if_exists=True
        ).remote(cfg, self.postgres_url)
        ray.get(self.supervisor.start.remote())
        serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
        serve.run(
            EngineIngress.options(num_replicas=cfg.serve_replicas).bind(
                cfg, self.postgres_url, self.redis_url, self.nats_url, self.secrets),
            name=SERVE_APP_NAME, route_prefix="/", blocking=False,
        )

    def stop(self) -> None:
        try:
            import ray

            if ray.is_initialized():
                from ray import serve

                from dailydoco.actors.refs import SUPERVISOR_NAME, chain_actor_name, shard_actor_name

                serve.shutdown()
                names = [SUPERVISOR_NAME] + [shard_actor_name(i) for i in range(self.config.shard_actors)] + [
                    chain_actor_name(i) for i in range(self.config.chain_actors)]
                for name in names:
                    try:
                        ray.kill(ray.get_actor(name, namespace=self.config.namespace), no_restart=True)
                    except ValueError:
                        pass
                if self._ray_started_here:
                    ray.shutdown()
        finally:
            self.servers.stop()

    def __enter__(self) -> "EngineSystem":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
