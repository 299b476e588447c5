"""Quality benchmark: does a multi-task method train better, and at what cost?

Every method of :mod:`benchmarks.quality.methods` trains the same model with the same optimizer
and the same number of optimizer steps on each problem of :mod:`benchmarks.quality.problems`
(plus the analytic 2-task toy of :mod:`benchmarks.quality.toy`), over several seeds; the runner
reports held-out quality (mean ± std) and training wall-clock, as markdown tables and PNG figures.

Run ``python -m benchmarks.quality --quick`` (under a minute) or ``python -m benchmarks.quality``
(the full, seeded run).
"""
