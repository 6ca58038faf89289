"""Using a trained decoder: batched prediction files (generation), per-token log-likelihoods
(scoring) and export of a run's adapters or merged weights (export). The decode loop and sampler
they share are model/sampling.py; training lives in train/, scoring the outputs against
references in evaluation/.
"""
