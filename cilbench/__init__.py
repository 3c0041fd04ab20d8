"""cilbench: class-incremental learning benchmarks on pre-trained ViTs.

The built-in methods live in the top-level ``methods/`` folder but are imported as ``cilbench.methods``,
so a user's own ``methods`` package neither shadows them nor is shadowed. A wheel installs them at
``cilbench/methods``; in a checkout (editable, or ``PYTHONPATH=.``) the finder below maps the name."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_CHECKOUT_METHODS = Path(__file__).resolve().parent.parent / "methods"


class _MethodsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "cilbench.methods":
            return None
        return importlib.util.spec_from_file_location(fullname, _CHECKOUT_METHODS / "__init__.py",
                                                      submodule_search_locations=[str(_CHECKOUT_METHODS)])


if not (Path(__file__).resolve().parent / "methods").is_dir() and (_CHECKOUT_METHODS / "__init__.py").exists():
    sys.meta_path.insert(0, _MethodsFinder())
