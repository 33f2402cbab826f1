"""Run a function right after a module has been imported (or now, if it already has been).

The CPU backend is switched on inside ``import verl``, when most of verl is not loaded yet; importing the
modules it changes at that point would make every verl process pay for them (and could hit a partially
initialised ``verl``). So each change waits for its module: a meta-path finder wraps the module's loader and
calls the registered functions once the module body has run, before anyone else sees it.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType

logger = logging.getLogger(__name__)

Callback = Callable[[ModuleType], None]


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds the hooked modules through the other finders and wraps their ``exec_module``."""

    def __init__(self):
        self.pending: dict[str, list[Callback]] = {}
        self._searching = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending or getattr(self._searching, "active", False):
            return None
        self._searching.active = True  # the other finders may import; do not recurse into ourselves
        try:
            spec = next((found for finder in sys.meta_path if finder is not self and hasattr(finder, "find_spec")
                         and (found := finder.find_spec(fullname, path, target)) is not None), None)
        finally:
            self._searching.active = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        callbacks = self.pending.pop(fullname)
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            for callback in callbacks:
                callback(module)

        spec.loader.exec_module = exec_module  # source loaders are created per module: this touches only this one
        return spec


_finder = _AfterImportFinder()


def after_import(module_name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once ``module_name`` has been imported; at once if it already is."""
    module = sys.modules.get(module_name)
    if module is not None and getattr(module, "__spec__", None) is not None and module_name not in _finder.pending:
        callback(module)
        return
    _finder.pending.setdefault(module_name, []).append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
