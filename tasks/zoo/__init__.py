"""The pretrained model zoo, tasks side: what runs Lightning tasks (evaluation, release) and the ``moezoo zoo``
command. The core side (records, weights, cards) is :mod:`moezoo.zoo`; its docstring maps every room.

Nothing is imported here, so ``moezoo zoo list|info|download|card`` need no Lightning.
"""
