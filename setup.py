"""Thin shim so `python setup.py develop` keeps working; all metadata lives in pyproject.toml."""
from setuptools import setup

setup()
