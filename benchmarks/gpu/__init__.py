"""The parts of ``benchmarks/gpu_check.py``, one module each, and what they share.

:mod:`gpu.record` (the run, its budget and ``results.json``),
:mod:`gpu.environment` (what the machine offers), then the parts:
:mod:`gpu.correctness` (on :mod:`gpu.implementations` and, for the narrow
state, :mod:`gpu.narrow`), :mod:`gpu.step_time`
(on :mod:`gpu.step_variants`) and :mod:`gpu.training`.
"""
