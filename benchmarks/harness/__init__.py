"""What every benchmark script shares: shapes, the interleaved timer, statistics and output.

The scripts in ``benchmarks/`` say only what they time; this package holds how:

* :mod:`harness.shapes`: the model shape tables (GPT-2 small, TinyLlama 1.1B),
  one set of tensor names and one ``--small`` size for both frameworks;
* :mod:`harness.timing`: calls interleaved round by round, so that background
  load hits every variant alike;
* :mod:`harness.stats`: medians, minima and paired ratios of those samples;
* :mod:`harness.floor`: the memory-bandwidth floor of an optimizer step;
* :mod:`harness.machine`: the machine a result was measured on;
* :mod:`harness.output`: JSON results and number formatting;
* :mod:`harness.jax_step`: a jitted JAX step timed on donated buffers;
* :mod:`harness.ulp`: distances in units in the last place (bit patterns).

Framework imports stay inside the modules that need them (``jax_step``), so
a script for one framework runs where the other is not installed.
"""
