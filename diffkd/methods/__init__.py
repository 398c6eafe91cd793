"""The methods a config's ``method.name`` picks (registered in ``diffkd.method_options.METHODS``).

A method's module is imported when a run asks for it, not when the config is read.
"""

import importlib

from diffkd.method_options import METHODS
from diffkd.methods.base import ExportSpec, Method, Round


def method_class(name: str) -> type[Method]:
    """The class that implements method ``name`` (a key of ``METHODS``), importing its module."""
    module, _, cls = METHODS[name].implementation.partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["METHODS", "ExportSpec", "Method", "Round", "method_class"]
