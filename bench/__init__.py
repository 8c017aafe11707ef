"""gpudeck benchmarks: each bench_*.py has a main() that prints ratios measured in one run."""
