"""diffrt.bench: the tools that measure diffrt, apart from the runtime an embedding service imports.

* ``diffrt bench`` (:mod:`~diffrt.bench.benchmark`, :mod:`~diffrt.bench.report`): a model's latency under
  the baselines and diffrt's configurations, side by side; ``diffrt tune`` (:mod:`~diffrt.bench.tune`): the
  fastest configuration within a quality floor. Both run on :mod:`~diffrt.bench.zoo`'s workloads (the real
  architectures' shapes with random weights, the shipped digits models, or a diffusers model folder);
  their arguments are in :mod:`~diffrt.bench.cli`.
* :mod:`~diffrt.bench.harness`: environment stamp, timer, cold L2, host-sync counter, results files.
* Component benchmarks (``python -m diffrt.bench.bench_sampler``, ``bench_attention``, ``bench_int8``,
  ``bench_stream``, ``load_serve``), quality sweeps on the digits models (``quality_attention``,
  ``quality_int8``, ``quality_adaptive``) and ``publish`` (the README's performance table).

The folder also holds ``gpu.sh`` (everything a lent GPU should run, in one call) and ``results/``.
"""
