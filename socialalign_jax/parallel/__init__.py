"""How arrays are laid out on devices: the device mesh (mesh), the logical-axis rules that map what
a dimension is to where it lives (sharding), and the ahead-of-time memory plan of a step on a
topology (plan). Kept apart from model/ so that changing the parallelism layout never touches the
maths.
"""
