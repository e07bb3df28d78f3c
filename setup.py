"""Package discovery for the mapped layout: ``kernels/`` and ``tasks/`` install as ``moezoo.kernels`` and
``moezoo.tasks`` (every subpackage included automatically). Everything else lives in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
MAPPED = {
    package: folder
    for package, folder in {"moezoo": "moezoo", "moezoo.kernels": "kernels", "moezoo.tasks": "tasks"}.items()
    if (HERE / folder / "__init__.py").is_file()
}

packages = []
for package, folder in MAPPED.items():
    packages.append(package)
    packages += [f"{package}.{sub}" for sub in find_packages(folder)]

setup(packages=sorted(set(packages)), package_dir=MAPPED)
