"""Using a trained decoder: the on-device sampler, one jitted loop (sampling), batched prediction
files (generation), per-token log-likelihoods (scoring) and export of a run's adapters or merged
weights (export). Training lives in train/, scoring the outputs against references in evaluation/.
"""
