"""Tools that drive the rest of the package from the outside: the ahead-of-time memory and compile
plan of a training or decode step on a mesh or a TPU topology (plan), and the persona builder that
writes user profiles with a base model (personas). Nothing below imports them.
"""
