"""QuaRot-style rotations (Ashkboos et al. 2024): the math (hadamard.py), the model surgery (surgery.py) and the method
(method.py)."""
