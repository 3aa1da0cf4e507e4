"""One module per stage kind; importing this package registers every kind (see ``Stage.registry``)."""

from . import distill, export, grow, learn, pretrain, prune, qat, retrain, share, train  # noqa: F401  (imported to register)

DEFAULT_STAGES = ["train", "distill", "prune", "retrain", "share", "export"]
