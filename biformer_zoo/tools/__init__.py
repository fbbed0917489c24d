"""Tools over the models: parameter/FLOP reports (``report``, ``flops``), throughput benchmarks (``bench``), checkpoint
conversion (``convert``), the model and weight listings (``catalog``), and what they share (``arguments``,
``tables``). The ``biformer-zoo`` command (``biformer_zoo.cli``) is a thin layer over these modules."""
