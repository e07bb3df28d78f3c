"""Lightning tasks (installed as ``moezoo.tasks``): one folder per domain, all built on :mod:`moezoo`."""
