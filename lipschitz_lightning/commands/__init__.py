"""The commands: train (behind the root train.py), evaluate, certify, sample, benchmark, report,
and what their entry points share (the command line, settings checks, the allocator)."""
