"""vlfast's benchmarks: one bench_<op>.py per op, the runner behind `python -m vlfast bench`, and results/."""
