"""Package discovery for the mapped layout: ``kernels/`` and ``tasks/`` install as ``moezoo.kernels`` and
``moezoo.tasks`` (every subpackage included automatically). Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

MAPPED = {"moezoo": "moezoo", "moezoo.kernels": "kernels", "moezoo.tasks": "tasks"}

packages = []
for package, folder in MAPPED.items():
    packages.append(package)
    packages += [f"{package}.{sub}" for sub in find_packages(folder)]

setup(packages=sorted(set(packages)), package_dir=MAPPED)
