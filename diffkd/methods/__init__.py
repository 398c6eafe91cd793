"""The methods a config's ``method.name`` picks (registered in ``diffkd.method_options.METHODS``).

A method's module is imported when a run asks for it, not when the config is read. ``register`` adds a method
defined elsewhere (a plug-in, or the tests' toy method) to the same registry.
"""

import importlib

from diffkd.method_options import METHODS, RegisteredMethod
from diffkd.methods.base import ExportSpec, Method, Network, Phase, Round


def method_class(name: str) -> type[Method]:
    """The class that implements method ``name`` (a key of ``METHODS``), importing its module."""
    module, _, cls = METHODS[name].implementation.partition(":")
    return getattr(importlib.import_module(module), cls)


def register(method: type[Method]) -> type[Method]:
    """Make ``method`` selectable as ``method.name: <method.name>`` (usable as a class decorator)."""
    if not method.name or method.config_class.name != method.name:
        raise ValueError(f"{method.__name__} needs a name equal to its config_class's default name")
    METHODS[method.name] = RegisteredMethod(method.config_class, f"{method.__module__}:{method.__qualname__}")
    return method


__all__ = ["METHODS", "ExportSpec", "Method", "Network", "Phase", "Round", "method_class", "register"]
