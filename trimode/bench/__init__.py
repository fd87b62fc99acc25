"""`trimode bench`: which mode (and block length) to deploy at which load, measured.

targets.py   one interface, `stream(ask) -> Updates`: an engine dir in process, a Triton server
openai.py    the same over an OpenAI-compatible /v1/completions endpoint
prompts.py   the prompt set (a file, or eval's held-out prompts)
runner.py    closed loops per variant and concurrency -> the report
stats.py     percentiles, one cell's summary, speed-ups over AR, the advice
report.py    the table, the plot, the output folder
"""

from trimode.bench.runner import DEFAULT_CONCURRENCY, BenchSettings, run_bench
from trimode.bench.targets import Ask, BenchError, EngineTarget, Target, TritonTarget, Update

__all__ = [
    "DEFAULT_CONCURRENCY",
    "Ask",
    "BenchError",
    "BenchSettings",
    "EngineTarget",
    "Target",
    "TritonTarget",
    "Update",
    "run_bench",
]
