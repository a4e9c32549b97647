"""Optimizers: paged AdamW (32-bit or 8-bit state) and the size of an optimizer's state."""

from cura.optim.paged_adamw import PagedAdamW, state_bytes

__all__ = ["PagedAdamW", "state_bytes"]
