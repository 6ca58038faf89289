"""The decoder as code: its typed, hashable shape (config) and the named shapes (presets), the pure
building blocks (layers), the Flax Linen modules that declare every variable (modules), PAC-LoRA
(pac_lora), and the functional entry points taken across the jit boundary (decoder: init_params,
forward, lm_logits, ...). Where the numbers come from is weights/; how arrays sit on devices is
parallel/; this package only names logical axes.
"""
