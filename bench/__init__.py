"""seqguard benchmark suite: open-loop gRPC load, a do-nothing echo ceiling, a naive baseline.

    python -m bench.run --model DIR --events FILE          # the whole sweep (see BENCHMARKS.md)
    python -m bench.run --model DIR --events FILE --quick  # a smoke run of a few seconds
"""
