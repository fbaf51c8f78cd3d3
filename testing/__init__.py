"""What the tests and the benchmarks share, and the product never imports: a launcher for
the real stack on free loopback ports (stack.py) and the model-free engine double
(engine_double.py) that isolates the serving path in benchmarks."""
