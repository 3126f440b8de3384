"""torch models: the Ambrosio–Tortorelli solver, the base/detail tokenizer, the transformers and samplers.

Added by issues 4 (solver), 5 (tokenizer), 7 (CART transformer) and 9 (NDP); one concept per file.
"""
