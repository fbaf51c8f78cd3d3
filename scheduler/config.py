"""SchedulerConfig: the scheduler process's one config object (flags and INFLIGHT_*
variables come from its fields)."""

from __future__ import annotations

import dataclasses

from inflight import sockets


@dataclasses.dataclass
class SchedulerConfig:
    gateway_address: str = dataclasses.field(default=sockets.GATEWAY_ADDRESS, metadata={"help": "ZeroMQ address to bind for gateways"})
    worker_address: str = dataclasses.field(default=sockets.WORKER_ADDRESS, metadata={"help": "ZeroMQ address to bind for workers"})
    max_queued: int = dataclasses.field(default=1024, metadata={"help": "requests waiting for a worker at most; more get RESOURCE_EXHAUSTED"})
    worker_queue_factor: float = dataclasses.field(default=2.0, metadata={"help": "a worker holds up to this many times its max batch size"})
    worker_timeout: float = dataclasses.field(default=10.0, metadata={"help": "seconds without a heartbeat before a worker counts as dead and its requests move to another"})
    gateway_timeout: float = dataclasses.field(default=10.0, metadata={"help": "seconds without a hello (a gateway sends one a second) before a gateway counts as gone and its requests are aborted"})
    progress_timeout: float = dataclasses.field(default=60.0, metadata={"help": "seconds a worker holding requests may go without producing a token before it counts as stalled and its requests move to another"})
    balance_slack: int = dataclasses.field(default=16, metadata={"help": "how many more requests a prefix-holding worker may run than the least busy before load wins"})
    cache_threshold: float = dataclasses.field(default=0.5, metadata={"help": "route by prefix only when a worker holds at least this share of the prompt"})
    curve_secret_key: str = dataclasses.field(default="", metadata={"help": "CURVE: the scheduler's key pair file (*.key_secret); with --curve-authorized-keys, links are encrypted and only known gateways and workers get in"})
    curve_authorized_keys: str = dataclasses.field(default="", metadata={"help": "CURVE: a folder of the public key files (*.key) of the gateways and workers let in"})
    metrics_host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "address /metrics, /health and /ready listen on; 0.0.0.0 for every interface"})
    metrics_port: int = dataclasses.field(default=9401, metadata={"help": "HTTP port for /metrics, /health and /ready; 0 means off"})
