"""How arrays are laid out on devices: the device mesh (mesh), the logical-axis rules that map what
a dimension is to where it lives (axis_rules, sharding). Kept apart from model/ so that changing the
parallelism layout never touches the maths; the model's own logical axes are model/axes.py, and the
ahead-of-time memory plan of a step is tools/plan.py.
"""
