"""The loop's side work as callbacks (after OLMo-core's `train/callbacks/`): `base` names the points
the loop calls, each other module is one kind of side work. Read `base.py` first, then `default.py`."""
