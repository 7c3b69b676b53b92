"""Orthogonal matrices for rotations, as pure functions over float64 tensors.

A seeded random Hadamard (QuaRot §3, "randomized Hadamard"): Q = diag(s) · H / sqrt(n), s a seeded random ±1 vector
and H a Hadamard matrix of order n (entries ±1, H Hᵀ = n I). Hadamard matrices exist only for n = 1, 2 or a multiple
of 4; here H is a Kronecker product of a Sylvester matrix (order 2^k) and at most one Paley matrix (order q + 1 for a
prime q ≡ 3 mod 4, Paley I; 2(q + 1) for a prime q ≡ 1 mod 4, Paley II), the smallest Paley order that leaves a power
of two: SmolLM2's hidden 576 = 36 (Paley II, q = 17) · 16, its intermediate 1536 = 12 (Paley I, q = 11) · 128,
Gemma-3-270M's hidden 640 = 20 (Paley I, q = 19) · 32, head dims 64 and 256 Sylvester alone. Where no such product
exists (e.g. n = 2 · odd) the matrix is a seeded Haar-random orthogonal one: the Q of a Gaussian matrix's QR, the
column signs fixed by R's diagonal (Mezzadri 2007). `Orthogonal.kind` says which was built.

Row-vector convention, as nn.Linear: a rotated activation is x Q."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

F64 = torch.float64


def sylvester(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order n = 2^k (H_1 = [1], H_2m = [[H, H], [H, -H]])."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix has order 2^k, not {n}")
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), χ the quadratic character mod the prime q (0 at 0, 1 on squares, −1 otherwise)."""
    chi = torch.full((q,), -1.0, dtype=F64)
    chi[0] = 0
    chi[torch.tensor(sorted({(x * x) % q for x in range(1, q)}))] = 1
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def paley(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n by Paley's constructions: I (n = q + 1, q ≡ 3 mod 4 prime: H = I + S with S the
    skew conference matrix [[0, 1ᵀ], [−1, Q]]) or II (n = 2(q + 1), q ≡ 1 mod 4 prime: the symmetric conference
    matrix C = [[0, 1ᵀ], [1, Q]] gives H = C ⊗ [[1, −1], [−1, −1]] + I ⊗ [[1, 1], [1, −1]])."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(n, n, dtype=F64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(n, dtype=F64) + s
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1, dtype=F64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=F64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=F64), b)
    raise ValueError(f"no Paley construction of order {n}")


def _has_paley(m: int) -> bool:
    try:
        paley(m)
    except ValueError:
        return False
    return True


def hadamard_factors(n: int) -> list[torch.Tensor] | None:
    """±1 matrices whose Kronecker product is a Hadamard matrix of order n: [Paley(m), Sylvester(n / m)] for the
    smallest Paley order m with n / m a power of two ([Sylvester(n)] when n is one); None when there is none."""
    for m in range(1, n + 1):
        p = n // m
        if n % m or p & (p - 1):
            continue
        if m == 1:
            return [sylvester(n)]
        if m % 4 == 0 and _has_paley(m):  # a Hadamard order > 2 is a multiple of 4
            return [paley(m)] + ([sylvester(p)] if p > 1 else [])
    return None


def kron_apply(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x @ (F_1 ⊗ F_2 ⊗ ...) over the last dim without forming the product: that dim viewed as (n_1, n_2, ...), each
    axis multiplied by its factor (cost n · Σ n_i instead of n²)."""
    sizes = [f.shape[0] for f in factors]
    shape = x.shape
    y = x.reshape(*shape[:-1], *sizes)
    nd = len(sizes)
    for i, f in enumerate(factors):
        y = torch.movedim(torch.movedim(y, i - nd, -1) @ f, -1, i - nd)
    return y.reshape(shape)


@dataclass
class Orthogonal:
    """Q = diag(signs) · (F_1 ⊗ F_2 ⊗ ...), each factor orthonormal (a Hadamard factor already divided by the
    square root of its order), float64; `kind` names the construction for the record."""

    signs: torch.Tensor  # [n], ±1
    factors: list[torch.Tensor]
    kind: str

    @property
    def n(self) -> int:
        return self.signs.numel()

    def matrix(self) -> torch.Tensor:
        """Q as a dense float64 [n, n] matrix."""
        k = self.factors[0]
        for f in self.factors[1:]:
            k = torch.kron(k, f)
        return self.signs[:, None] * k

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x Q over the last dim, in x's dtype (computed in float32 at least)."""
        work = torch.promote_types(x.dtype, torch.float32)
        fs = [f.to(x.device, work) for f in self.factors]
        return kron_apply(x.to(work) * self.signs.to(x.device, work), fs).to(x.dtype)


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator).to(F64) * 2 - 1


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal [n, n] matrix: Q of the QR of a Gaussian matrix, columns signed by diag(R)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=F64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def seeded_rotation(n: int, seed: int) -> Orthogonal:
    """The seeded random Hadamard of order n (module docstring), or a seeded random orthogonal matrix where no
    Hadamard construction here has that order."""
    g = torch.Generator().manual_seed(seed)
    factors = hadamard_factors(n)
    if factors is None:
        return Orthogonal(torch.ones(n, dtype=F64), [random_orthogonal(n, g)], f"random orthogonal {n} (QR)")
    kind = "hadamard " + "x".join(str(f.shape[0]) for f in factors)
    return Orthogonal(random_signs(n, g), [f / math.sqrt(f.shape[0]) for f in factors], kind)
