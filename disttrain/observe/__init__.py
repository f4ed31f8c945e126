"""Seeing a run: metrics and their reduction, loggers, progress, profiler, flight recorder,
plots, and which ranks print."""
