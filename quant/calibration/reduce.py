"""Data-parallel calibration (#18): every rank holds a contiguous shard of the calibration sequences, and every
statistic a method reduces over them (sums, counts, maxima) passes through a Reducer, so all ranks apply the same
result. With no process group (one process) every reduction is the identity, and methods keep their one-process
arithmetic exactly."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reducer:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Reducer":
        """All ranks of the initialized default process group (torch.distributed), else this process alone."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> slice:
        """This rank's calibration sequences of n: contiguous, in order (rank r: [n*r/W, n*(r+1)/W))."""
        if n < self.world:
            raise ValueError(f"{n} calibration sequences cannot be shared by {self.world} ranks (need >= 1 each)")
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def _all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if not self.parallel:
            return t
        import torch.distributed as dist

        if dist.get_backend() == "nccl" and t.device.type != "cuda":  # NCCL reduces GPU tensors only (counts, sums
            tmp = t.to(torch.device("cuda", torch.cuda.current_device()))  # made on the host by sum_float)
            dist.all_reduce(tmp, op=getattr(dist.ReduceOp, op))
            t.copy_(tmp)
            return t
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks, in place (the identity on one process)."""
        return self._all_reduce(t, "SUM")

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, "MAX")

    def sum_float(self, *values: float) -> list[float]:
        """Python numbers summed over ranks (float64)."""
        if not self.parallel:
            return list(values)
        return self.sum(torch.tensor(values, dtype=torch.float64)).tolist()
