"""Parallelism planner: predicts per-GPU memory and step time for every valid layout of a job.

`state` (parameter / gradient / optimizer bytes per rank), `hardware` (GPU profiles), `activations`
and `step_time` (the cost models), `layouts` (enumeration through the trainer's own validation) and
`plan` (ranking, TOML output, explanations). The CLI is tools/plan.py.
"""
