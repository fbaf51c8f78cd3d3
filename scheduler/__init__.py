"""The scheduler process: owns every request's lifecycle between gateways and workers.
`lifecycle.py` is that lifecycle without sockets (admission, dispatch, relaying, cancel,
liveness, deadlines); its policies each in a small module, `admission.py` (bounded
queue) and `routing.py` (prefix affinity plus load); `config.py`, `metrics.py`; `main.py`,
the process: its sockets and loop. Imports inflight/ only."""
