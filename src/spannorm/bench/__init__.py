"""What the benchmarks in scripts/benchmark*.py are built from, one job per module:

- `timing`: clocks, a timed call, interleaved rounds of several arms, and `StepClock`, the
  Lightning callback that times a `train.py` run's steps;
- `stats`: paired ratios of two arms measured side by side, their median and its interval;
- `memory`: peak resident memory of a process and of the processes below it, sampled while they
  run (the reading itself is `spannorm.memory`'s, which the throughput monitor uses too), page
  faults;
- `machine`: the machine and its load, as the results describe them;
- `bare`: `BareLoop`, the training step without Lightning, and the runs built on it;
- `twin`: `TwinClock`, a `StepClock` that interleaves a bare-loop twin into a `train.py` run.

A leaf: the scripts and tests use it, and no module of the package outside it imports it
(tests/test_layout.py checks this).
"""
