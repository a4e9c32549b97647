"""Paged AdamW: AdamW whose state stays on the device while it fits and is paged to host memory under pressure.

The update is torch's AdamW (Loshchilov & Hutter 2019) op for op, as in `torch.optim.AdamW(foreach=False)`:

    t += 1
    p  <- p * (1 - lr * wd)                                   decoupled weight decay
    m  <- lerp(m, g, 1 - b1)              = b1 m + (1 - b1) g
    v  <- v * b2 + (1 - b2) g * g
    p  <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

so the parameters are bit-identical to torch's wherever the state lives. QLoRA (Dettmers et al. 2023) pages
optimizer state so that a memory spike does not end the run. Placement, per parameter, decided at each
step from the room left at the device's peak (`PeakHeadroom`, or an injected `free_memory` function: the
tests simulate a device budget on CPU with it)::

    paging="auto"    resident on the device while free - its bytes >= reserve_bytes; when free memory falls
                     under reserve_bytes, resident states are evicted (largest first) to (pinned) host
                     memory; a paged state comes back once free - its bytes >= 2 * reserve_bytes
    paging="always"  every state in host memory, paged in for each update (the most memory-frugal)
    paging="never"   every state on the device (plain AdamW)

A paged state is copied in for its update (on a side stream on CUDA, overlapping the previous update),
updated on the device and copied back, with at most a few parameters' pages on the device at once; a
resident one is updated in place: nothing is copied while everything fits. `paging_stats` counts the bytes
moved. `optim_bits=8` stores m and v blockwise-quantized (see `state8bit`): 4x less state, dequantized to
float32 for each update.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

import torch

from cura.constants import OPTIM_BITS, PAGING_MODES
from cura.errors import CuraError
from cura.optim.state8bit import dequantize_blockwise, dynamic_map, quantize_blockwise

_MOMENTS = ("exp_avg", "exp_avg_sq")
_SIGNED = {"exp_avg": True, "exp_avg_sq": False}
_IN_FLIGHT = 2  # parameters whose device pages may be alive at once (copy-in, update, copy-out overlap)
DEFAULT_RESERVE_BYTES = 1 << 30
"""Device memory `paging="auto"` keeps free beyond the optimizer state: room for the next step's
activation peak to vary (a longer batch) and for the in-flight pages of paged states. 1 GiB is about the
spread of peaks we expect between batches of a 7-8B QLoRA run at sequence 2048 (the planner's activation
term per 2048 tokens is of that order); lower it on small cards, or pass paging="always"."""


def device_free_bytes(device: torch.device) -> int | None:
    """Bytes torch could still allocate on `device` now: the driver's free memory plus what torch's caching
    allocator has reserved but not handed out. None for the CPU: host memory is the page file itself."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class PeakHeadroom:
    """The default `free_memory`: what would be left at the next forward/backward peak, not just now.

    At `step()` the activations are gone, so free memory alone overstates the room. The peak's excursion
    above what persists (``transient = max_memory_allocated - memory_allocated``) is read whenever the run's
    peak grew since the last call (it is then this step's peak) and kept otherwise, without resetting the
    peak statistics the training loop reports; headroom = free now - transient. Evicting s bytes of state
    raises the headroom by s (they leave `memory_allocated`, the peak's excursion stays), so the decision is
    stable from step to step."""

    def __init__(self) -> None:
        self._peak: dict[torch.device, int] = {}
        self._transient: dict[torch.device, int] = {}

    def __call__(self, device: torch.device) -> int | None:
        free = device_free_bytes(device)
        if free is None:
            return None
        peak, now = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
        if peak > self._peak.get(device, -1):
            self._peak[device], self._transient[device] = peak, peak - now
        return free - self._transient[device]


def _check(name: str, value: float, ok: bool, hint: str) -> None:
    if not ok:
        raise CuraError(f"PagedAdamW {name} must be {hint}, got {value!r}")


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with host-resident (optionally 8-bit) state, paged to the parameter's device per update.

    `optim_bits`: 32 (state in the parameter's dtype, like torch) or 8 (blockwise dynamic quantization).
    `page_device`: where updates run; default each parameter's own device. `paging`, `reserve_bytes` and
    `free_memory` (device -> free bytes, or None for "unlimited"; default `PeakHeadroom()`): see the
    module docstring. State tensors in `state_dict()` are `step` (float32 scalar) plus `exp_avg`,
    `exp_avg_sq` (32-bit) or `exp_avg_codes` (uint8), `exp_avg_absmax` (float32 per 256 values) and the
    same for `exp_avg_sq` (8-bit).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        optim_bits: int = 32,
        page_device: torch.device | str | None = None,
        paging: str = "auto",
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        free_memory: Callable[[torch.device], int | None] | None = None,
    ) -> None:
        _check("lr", lr, lr >= 0, "zero or more")
        _check("betas", betas, len(betas) == 2 and all(0 <= b < 1 for b in betas), "two numbers in [0, 1)")
        _check("eps", eps, eps >= 0, "zero or more")
        _check("weight_decay", weight_decay, weight_decay >= 0, "zero or more")
        _check("optim_bits", optim_bits, optim_bits in OPTIM_BITS, " or ".join(map(str, OPTIM_BITS)))
        _check("paging", paging, paging in PAGING_MODES, " or ".join(map(repr, PAGING_MODES)))
        _check("reserve_bytes", reserve_bytes, reserve_bytes >= 0, "zero or more")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, optim_bits=optim_bits)
        super().__init__(params, defaults)
        self.page_device = torch.device(page_device) if page_device is not None else None
        self.paging, self.reserve_bytes = paging, reserve_bytes
        self.free_memory = free_memory or PeakHeadroom()
        self.paged: dict[torch.Tensor, bool] = {}  # param -> its state is in host memory (absent: unplaced)
        self.paging_stats = dict(bytes_in=0, bytes_out=0, evictions=0, promotions=0)

    # -- where state lives ---------------------------------------------------------------------------------
    def _home(self, param: torch.Tensor) -> torch.device:
        """Host memory for accelerator parameters (the page file); the parameter's device otherwise."""
        return torch.device("cpu") if param.device.type != "cpu" else param.device

    def _to_home(self, tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """A fresh host copy of `tensor` (pinned where the parameter is on CUDA: asynchronous copies)."""
        pin = param.device.type == "cuda" and torch.cuda.is_available()
        home = torch.empty(tensor.shape, dtype=tensor.dtype, device=self._home(param), pin_memory=pin)
        return home.copy_(tensor.detach())

    def _init_state(self, param: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
        """Zero state in host memory; `_place` then moves it to the device where it fits."""
        state: dict[str, torch.Tensor] = {"step": torch.tensor(0.0, dtype=torch.float32)}
        zeros = torch.zeros_like(_local(param), memory_format=torch.preserve_format, device="cpu")
        for name in _MOMENTS:
            if bits == 8:
                codes, absmax = quantize_blockwise(zeros, dynamic_map(_SIGNED[name]))
                state[f"{name}_codes"], state[f"{name}_absmax"] = (
                    self._to_home(codes, param),
                    self._to_home(absmax, param),
                )
            else:
                state[name] = self._to_home(zeros, param)
        return state

    # -- placement: resident on the device, or paged in host memory -----------------------------------------
    @staticmethod
    def _state_nbytes(state: dict) -> int:
        return sum(t.nbytes for name, t in state.items() if name != "step")

    def _move(self, param: torch.Tensor, to_host: bool) -> None:
        """Move every state tensor of `param` (not the CPU step counter) to host memory or to the device."""
        state, device = self.state[param], self._device(param)
        for name, t in state.items():
            if name != "step":
                state[name] = self._to_home(t, param) if to_host else t.to(device)
        self.paged[param] = to_host

    def _place(self, work: list) -> None:
        """Decide, per parameter with state, whether it stays resident or is paged (see the module docstring).

        A state never placed (new, or restored from a checkpoint: both start in host memory) goes to the
        device if it fits; under pressure the largest resident states are evicted first (fewest moves)."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for _, param in work:
            by_device.setdefault(self._device(param), []).append(param)
        for device, params in by_device.items():
            if self.paging != "auto":
                for param in params:
                    if self.paged.get(param) != (self.paging == "always"):
                        self._move(param, to_host=self.paging == "always")
                continue
            free = self.free_memory(device)
            for param in params:  # new or restored states
                if param not in self.paged:
                    size = self._state_nbytes(self.state[param])
                    fits = free is None or free - size >= self.reserve_bytes
                    self._move(param, to_host=not fits)
                    free = None if free is None else free - (size if fits else 0)
            if free is None:
                continue
            resident = sorted((p for p in params if not self.paged[p]), key=lambda p: -p.numel())
            while free < self.reserve_bytes and resident:
                param = resident.pop(0)
                free += self._state_nbytes(self.state[param])
                self._move(param, to_host=True)
                self.paging_stats["evictions"] += 1
            for param in sorted((p for p in params if self.paged[p]), key=lambda p: p.numel()):
                size = self._state_nbytes(self.state[param])
                if free - size >= 2 * self.reserve_bytes:
                    self._move(param, to_host=False)
                    free -= size
                    self.paging_stats["promotions"] += 1

    # -- one update ----------------------------------------------------------------------------------------
    def _fetch(self, t: torch.Tensor, device: torch.device, paged: bool) -> torch.Tensor:
        """`t` itself when resident; a device copy of the page when paged (counted in `paging_stats`)."""
        if not paged:
            return t
        self.paging_stats["bytes_in"] += t.nbytes
        return t.to(device, non_blocking=True, copy=True)

    def _page_in(self, state: dict, device: torch.device, bits: int, dtype: torch.dtype, paged: bool) -> dict:
        """The moments as full-precision tensors on `device`: the state itself when resident (32-bit)."""
        moments = {}
        for name in _MOMENTS:
            if bits == 8:
                codes = self._fetch(state[f"{name}_codes"], device, paged)
                absmax = self._fetch(state[f"{name}_absmax"], device, paged)
                moments[name] = dequantize_blockwise(codes, absmax, dynamic_map(_SIGNED[name]), dtype)
            else:
                moments[name] = self._fetch(state[name], device, paged)
        return moments

    def _page_out(self, state: dict, moments: dict, bits: int, paged: bool) -> None:
        for name in _MOMENTS:
            if bits == 8:
                codes, absmax = quantize_blockwise(moments[name], dynamic_map(_SIGNED[name]))
                updated = {f"{name}_codes": codes, f"{name}_absmax": absmax}
            else:
                updated = {name: moments[name]}
            for key, value in updated.items():
                if value.data_ptr() != state[key].data_ptr():
                    state[key].copy_(value, non_blocking=True)
                    if paged:
                        self.paging_stats["bytes_out"] += value.nbytes

    @staticmethod
    def _adamw(param, grad, exp_avg, exp_avg_sq, step_t, lr, beta1, beta2, eps, weight_decay) -> None:
        """torch.optim.adam._single_tensor_adam with decoupled weight decay, op for op."""
        step_t += 1
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)

    def _device(self, param: torch.Tensor) -> torch.device:
        return self.page_device if self.page_device is not None else param.device

    def _update(self, group: dict, param: torch.Tensor, moments: dict, device: torch.device) -> None:
        local, local_grad = _local(param), _local(param.grad)  # a sharded (FSDP) parameter: this rank's rows
        target = local if local.device == device else local.to(device)
        grad = local_grad if local_grad.device == device else local_grad.to(device)
        beta1, beta2 = group["betas"]
        state = self.state[param]
        self._adamw(target, grad, moments["exp_avg"], moments["exp_avg_sq"], state["step"],
                    group["lr"], beta1, beta2, group["eps"], group["weight_decay"])  # fmt: skip
        if target is not local:
            local.copy_(target)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for group, param in work:
            if param.grad.is_sparse:
                raise CuraError("PagedAdamW does not support sparse gradients; use dense embeddings")
            if not self.state[param]:
                self.state[param].update(self._init_state(param, group["optim_bits"]))
        self._place(work)
        cuda = torch.cuda.is_available()
        streamed = [(g, p) for g, p in work if self.paged[p] and cuda and self._device(p).type == "cuda"]
        streamed_ids = {id(p) for _, p in streamed}
        for group, param in (w for w in work if id(w[1]) not in streamed_ids):  # resident, or paged on CPU
            device, paged = self._device(param), self.paged[param]
            moments = self._page_in(self.state[param], device, group["optim_bits"], param.dtype, paged)
            self._update(group, param, moments, device)
            self._page_out(self.state[param], moments, group["optim_bits"], paged)
        if streamed:
            self._paged_step(streamed)
        return loss

    def _paged_step(self, work: list) -> None:
        """Page k+1 is copied in on a side stream while page k is updated on the main stream; page k is
        copied out on the side stream behind its update; at most a few pages stay on the device."""
        side = torch.cuda.Stream()

        def prefetch(k: int):
            group, param = work[k]
            device = self._device(param)
            with torch.cuda.stream(side):
                moments = self._page_in(self.state[param], device, group["optim_bits"], param.dtype, True)
            return moments, side.record_event()

        in_flight: deque = deque()
        upcoming = prefetch(0)
        for k, (group, param) in enumerate(work):
            (moments, ready), device = upcoming, self._device(param)
            upcoming = prefetch(k + 1) if k + 1 < len(work) else None
            main = torch.cuda.current_stream(device)
            main.wait_event(ready)
            self._update(group, param, moments, device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self._page_out(self.state[param], moments, group["optim_bits"], True)
            in_flight.append((side.record_event(), moments))
            while len(in_flight) > _IN_FLIGHT:
                in_flight.popleft()[0].synchronize()
        side.synchronize()

    # -- resume ----------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore state exactly: dtypes kept (uint8 codes stay uint8), tensors back in host memory.

        torch's own loader would cast every state tensor to the parameter's dtype and device, which breaks
        the 8-bit codes and paging; so the state is checked and placed here, the groups by torch.
        """
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(ids) != len(params):
            raise CuraError(
                f"the optimizer state holds {len(ids)} parameters but this run trains {len(params)}; resume "
                "with the same model and LoRA settings"
            )
        by_id = dict(zip(ids, params, strict=True))
        restored: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for key, saved in state_dict.get("state", {}).items():
            param = by_id.get(int(key))
            if param is None:
                raise CuraError(
                    f"the optimizer state names parameter {key}, which this optimizer does not have"
                )
            restored[param] = {name: self._restore(name, value, param, key) for name, value in saved.items()}
        super().load_state_dict({**state_dict, "state": {}})
        self.paged.clear()  # restored state is in host memory; the next step places it again
        for param, state in restored.items():
            self.state[param] = state

    def _restore(self, name: str, value, param: torch.Tensor, key) -> torch.Tensor:
        value = value if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float32)
        if name == "step":
            return value.detach().to("cpu", torch.float32, copy=True)
        shape = tuple(_local(param).shape)
        if not name.endswith("_absmax") and tuple(value.shape) != shape:
            raise CuraError(
                f"optimizer state '{name}' of parameter {key} has shape {tuple(value.shape)} but the parameter "
                f"has {shape}; resume with the same model and LoRA settings"
            )
        return self._to_home(value.to(param.dtype) if name in _MOMENTS else value, param)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a parameter sharded by FSDP2: its state and update are per shard),
    or `t` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by every tensor in the optimizer's state (moments, quantization constants, steps)."""
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
