"""Package discovery for the dsaforge namespace (metadata lives in pyproject.toml).

The design card's top-level folders (model/, kernels/, synth/, eval/, components/, pipelines/) are
installed as dsaforge.model, dsaforge.kernels, ...; this finds their subpackages so a new folder
never needs a line here.
"""
from setuptools import find_packages, setup

ROOTS = {"dsaforge": "dsaforge", "dsaforge.model": "model", "dsaforge.kernels": "kernels",
         "dsaforge.synth": "synth", "dsaforge.eval": "eval", "dsaforge.components": "components",
         "dsaforge.pipelines": "pipelines"}

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=ROOTS,
      package_data={"dsaforge": ["console/static/*", "console/templates/*", "py.typed"]})
