"""Example handlers, used by the tests, the benchmarks and the default configuration."""
