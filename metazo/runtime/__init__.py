"""Runtime measurements (memory, speed) used by scripts and benchmarks."""
