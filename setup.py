"""Shim so that tools which still call `setup.py` work; all metadata lives in pyproject.toml."""

from setuptools import setup

setup()
