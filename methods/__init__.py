"""Built-in methods, imported as ``cilbench.methods`` (see ``cilbench/__init__.py``).

cilbench finds them through the ``cilbench.methods`` entry-point group, like third-party methods:
the ``builtin`` entry point names this package, and importing it imports every module here, each of
which registers itself. A new method is one new file; no list to edit.
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "common":
        importlib.import_module(f"{__name__}.{_module.name}")
