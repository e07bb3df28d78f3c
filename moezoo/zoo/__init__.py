"""The pretrained model zoo, core side: what needs nothing but PyTorch.

The zoo's rooms, one job each:

- records: :mod:`moezoo.models.pretrained` (the JSON record of a release: read, write, register) and
  :mod:`moezoo.models.pretrained_cfg` (:class:`PretrainedCfg`, what a record holds);
- weights: :mod:`moezoo.models.hub` (cache, download, verify, load, save);
- cards: :mod:`moezoo.zoo.cards` (a release's model card, rendered from its record alone);
- summaries: :mod:`moezoo.zoo.summary` (parameter counts and router settings written into a record);
- on the tasks side, because they run Lightning tasks: :mod:`moezoo.tasks.zoo.specs` (building a task or data
  module from its ``class_path`` spec), :mod:`moezoo.tasks.zoo.evaluation` (``moezoo zoo eval``),
  :mod:`moezoo.tasks.zoo.release` (``moezoo zoo release``), :mod:`moezoo.tasks.zoo.citations` and
  :mod:`moezoo.tasks.zoo.cli` (the ``moezoo zoo`` command).
"""
