"""The decoder as code: its typed, hashable shape (config) and the named shapes (presets), the pure
building blocks (layers), the Flax Linen modules that declare every variable (modules), PAC-LoRA
(pac_lora), the functional entry points taken across the jit boundary (decoder: init_params,
init_adapters, forward, lm_logits, ...), the one next-token NLL (nll), the logical axes of every
model array read from the declarations (axes), and the on-device KV-cache decode loop and sampler
(sampling). Where the numbers come from is weights/; how logical axes map to devices is parallel/.
"""
