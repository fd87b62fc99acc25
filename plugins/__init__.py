"""The three hot-path ops of the tri-mode loop.

Each op is called from exactly one place in the runtime, so a kernel or an engine plugin can
replace it. `reference` holds the pure-torch versions that state the math (and are the oracle).
"""
