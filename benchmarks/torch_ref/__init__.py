"""PyTorch reference of PAC-LoRA written the way the original PEFT-style code computes it.

Used only by the benchmarks, as the 'PyTorch original' side of each comparison.
"""
