"""The checkpoint extension namespaces (``Checkpoint.extensions``): one place that names them.

A stage declares which of them it writes and which weight-pinning ones it accepts on its input
(``Stage.writes_extensions`` / ``Stage.accepts_extensions``); the runner refuses a chain that
puts a stage after state it would invalidate.
"""

from __future__ import annotations

TASKS_EXT = "tasks"  # learn: task heads, columns, labels, history
EWC_EXT = "ewc"  # learn, method ewc: Fishers and anchors
PACKNET_EXT = "packnet"  # learn, method packnet: which task owns each weight
PIGGYBACK_EXT = "piggyback"  # learn, method piggyback: each task's bit masks
QAT_EXT = "qat"  # qat: the fake-quantizers' trained int8 ranges

PER_WEIGHT = (EWC_EXT, PACKNET_EXT, PIGGYBACK_EXT)
"""State kept per weight tensor: a stage that changes the layers' shapes would leave it the old ones."""

PINS_WEIGHTS = {QAT_EXT: "its int8 ranges fit the weights it trained"}
"""State fitted to the exact weights: only a stage that accepts it may follow the stage that wrote
it (the value says why, for the refusal)."""
