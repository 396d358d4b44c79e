"""Benchmarks of the dispatcher and the bot runtime, each runnable as `python bench/<name>.py`;
they measure and report through `bench.report` and run the services through `testkit`."""
