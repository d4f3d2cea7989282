"""The hidden losses (`objective.hidden.loss`): one class per loss, one file each, listed in
`registry.py`. A class declares what it needs (a projector, a normalised target, the teacher's head)
and its FLOPs per token, and computes its sum over the valid positions of one (student layer,
teacher layer) pair; `HiddenObjective`, the run assembly, the study grid and the FLOPs count ask the
class, never the loss's name. `base.py` is the interface. Adding a loss: one file here, its class in
`registry.CLASSES`, its name and help in `hld.config_checks.HIDDEN_LOSSES`, and one test.

This `__init__` imports nothing (scripts/import_layers.py: a package that imported its own modules
would show as a circle); import `hld.distill.hidden_losses.registry`.
"""
