"""KD divergences as registered objects: one module per divergence, `registry` names them (and ranks
below hld.config, which reads their names and parameters: scripts/import_layers.py)."""
