"""The `inflight` command, the top layer: it starts the processes (gateway, scheduler,
worker), the whole local stack (`serve`), a chat against a running gateway, and the
engine offline (`generate`). Nothing below imports it."""
