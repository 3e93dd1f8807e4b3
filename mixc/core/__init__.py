"""The core floor of mixc: what a backend may import besides ``mixc.spec`` and ``mixc.compiler``.

mixc has two floors above the compiler. The core (this package) holds what every backend shares and
nothing that drives a command: the errors, atomic writes, datasets and image folders, the checkpoint
format, the run folder's file names, models and readers, the non-finite checks, the method batches,
weight decay's rule, thread counts and FLOP counts. The application (the rest of ``mixc/``: the CLI
and its commands, the training driver, the run folder's writer, evaluation, export...) drives the
backends through ``mixc.backends.base``'s interfaces.

Why two floors: a backend that imports the application cannot be written, tested or loaded without
it, and the application imports the backends (by entry point), so the two would form a circle. The
rule is checked on the source by ``tests/test_layering.py``: nothing here imports the application or
``mixc.backends``, and ``backends/`` imports only ``mixc.core``, ``mixc.spec``, ``mixc.compiler``
and itself. No torch or jax import here either.
"""
