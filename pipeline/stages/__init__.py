"""One module per stage kind; importing this package imports every module in it, and each stage
class registers its kind on definition (``Stage.__init_subclass__``): there is no hand-kept list.
A module added here is a kind (or a helper of one, such as ``export_tasks``)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

DEFAULT_STAGES = ["train", "distill", "prune", "retrain", "share", "export"]
