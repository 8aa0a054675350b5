"""Count the operations a block of PyTorch code issues, and those that would make a GPU wait.

A GPU step is bound by its host when Python issues many small operations, and more so when some
of them read a value back (``.item()``, ``nonzero``, boolean-mask indexing), since the host then
waits for the GPU to drain its queue. Counted on the CPU, these numbers carry over to the GPU:
the same code issues the same operations there.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "WAITING_OPS"]

# aten operations whose result size or value the host needs before it can go on.
WAITING_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"})


def _indexes_by_mask(name, args):
    """An ``index``/``index_put_`` with a boolean mask: it runs ``nonzero`` first."""
    return name.startswith("index") and any(
        isinstance(arg, (list, tuple))
        and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in arg)
        for arg in args
    )


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as counter: ...`` then ``counter.ops`` (aten operations dispatched,
    after autograd) and ``counter.waits`` (those that make the host wait on a GPU); set
    ``counter.phase`` inside the block to count phases apart (``counter.by_phase``)."""

    def __init__(self):
        super().__init__()
        self.phase = "all"
        self.by_phase = {}

    @property
    def ops(self):
        return sum(ops for ops, _ in self.by_phase.values())

    @property
    def waits(self):
        return sum(waits for _, waits in self.by_phase.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        ops, waits = self.by_phase.get(self.phase, (0, 0))
        waiting = name in WAITING_OPS or _indexes_by_mask(name, args)
        self.by_phase[self.phase] = (ops + 1, waits + int(waiting))
        return func(*args, **(kwargs or {}))
