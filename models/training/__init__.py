"""Training: the loop, evaluation (bits/dim), EMA, and the memory a step may take.
"""
