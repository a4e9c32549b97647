"""Paged AdamW: AdamW whose state lives in host memory and visits the accelerator only for its update.

The update is torch's AdamW (Loshchilov & Hutter 2019) op for op, as in `torch.optim.AdamW(foreach=False)`:

    t += 1
    p  <- p * (1 - lr * wd)                                   decoupled weight decay
    m  <- lerp(m, g, 1 - b1)              = b1 m + (1 - b1) g
    v  <- v * b2 + (1 - b2) g * g
    p  <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

so on a CPU the parameters are bit-identical to torch's. QLoRA (Dettmers et al. 2023) pages optimizer state
so that a memory spike does not end the run; here the state of a CUDA parameter stays in pinned host memory
and, per update, is copied in on a side stream (overlapping the previous update), updated on the device and
copied back, with at most a few parameters' state on the device at once. `optim_bits=8` stores m and v
blockwise-quantized (see `state8bit`): 4x less state, dequantized to float32 for each update.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch

from cura.constants import OPTIM_BITS
from cura.errors import CuraError
from cura.optim.state8bit import dequantize_blockwise, dynamic_map, quantize_blockwise

_MOMENTS = ("exp_avg", "exp_avg_sq")
_SIGNED = {"exp_avg": True, "exp_avg_sq": False}
_IN_FLIGHT = 2  # parameters whose device pages may be alive at once (copy-in, update, copy-out overlap)


def _check(name: str, value: float, ok: bool, hint: str) -> None:
    if not ok:
        raise CuraError(f"PagedAdamW {name} must be {hint}, got {value!r}")


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with host-resident (optionally 8-bit) state, paged to the parameter's device per update.

    `optim_bits`: 32 (state in the parameter's dtype, like torch) or 8 (blockwise dynamic quantization).
    `page_device`: where updates run; default each parameter's own device. State tensors in `state_dict()`
    are `step` (float32 scalar) plus `exp_avg`, `exp_avg_sq` (32-bit) or `exp_avg_codes` (uint8),
    `exp_avg_absmax` (float32 per 256 values) and the same for `exp_avg_sq` (8-bit).
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
    ) -> None:
        _check("lr", lr, lr >= 0, "zero or more")
        _check("betas", betas, len(betas) == 2 and all(0 <= b < 1 for b in betas), "two numbers in [0, 1)")
        _check("eps", eps, eps >= 0, "zero or more")
        _check("weight_decay", weight_decay, weight_decay >= 0, "zero or more")
        _check("optim_bits", optim_bits, optim_bits in OPTIM_BITS, " or ".join(map(str, OPTIM_BITS)))
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, optim_bits=optim_bits)
        super().__init__(params, defaults)
        self.page_device = torch.device(page_device) if page_device is not None else None

    # -- where state lives ---------------------------------------------------------------------------------
    def _home(self, param: torch.Tensor) -> torch.device:
        """Host memory for accelerator parameters (the page file); the parameter's device otherwise."""
        return torch.device("cpu") if param.device.type != "cpu" else param.device

    def _to_home(self, tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().to(self._home(param), copy=True)
        if param.device.type == "cuda" and torch.cuda.is_available():
            tensor = tensor.pin_memory()
        return tensor

    def _init_state(self, param: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {"step": torch.tensor(0.0, dtype=torch.float32)}
        zeros = torch.zeros_like(param, memory_format=torch.preserve_format, device="cpu")
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

    # -- one update ----------------------------------------------------------------------------------------
    def _page_in(self, state: dict, device: torch.device, bits: int, dtype: torch.dtype) -> dict:
        """The moments as full-precision tensors on `device` (views of the state itself on the CPU)."""
        moments = {}
        for name in _MOMENTS:
            if bits == 8:
                codes = state[f"{name}_codes"].to(device, non_blocking=True)
                absmax = state[f"{name}_absmax"].to(device, non_blocking=True)
                moments[name] = dequantize_blockwise(codes, absmax, dynamic_map(_SIGNED[name]), dtype)
            else:
                moments[name] = state[name].to(device, non_blocking=True)
        return moments

    def _page_out(self, state: dict, moments: dict, bits: int) -> None:
        for name in _MOMENTS:
            if bits == 8:
                codes, absmax = quantize_blockwise(moments[name], dynamic_map(_SIGNED[name]))
                state[f"{name}_codes"].copy_(codes, non_blocking=True)
                state[f"{name}_absmax"].copy_(absmax, non_blocking=True)
            elif moments[name].data_ptr() != state[name].data_ptr():
                state[name].copy_(moments[name], non_blocking=True)

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
        target = param if param.device == device else param.to(device)
        grad = param.grad if param.grad.device == device else param.grad.to(device)
        beta1, beta2 = group["betas"]
        state = self.state[param]
        self._adamw(target, grad, moments["exp_avg"], moments["exp_avg_sq"], state["step"],
                    group["lr"], beta1, beta2, group["eps"], group["weight_decay"])  # fmt: skip
        if target is not param:
            param.copy_(target)

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
        on_cuda = [torch.cuda.is_available() and self._device(p).type == "cuda" for _, p in work]
        paged = [w for w, cuda in zip(work, on_cuda, strict=True) if cuda]
        for group, param in (w for w, cuda in zip(work, on_cuda, strict=True) if not cuda):  # plain AdamW
            device = self._device(param)
            moments = self._page_in(self.state[param], device, group["optim_bits"], param.dtype)
            self._update(group, param, moments, device)
            self._page_out(self.state[param], moments, group["optim_bits"])
        if paged:
            self._paged_step(paged)
        return loss

    def _paged_step(self, work: list) -> None:
        """Page k+1 is copied in on a side stream while page k is updated on the main stream; page k is
        copied out on the side stream behind its update; at most a few pages stay on the device."""
        side = torch.cuda.Stream()

        def prefetch(k: int):
            group, param = work[k]
            device = self._device(param)
            with torch.cuda.stream(side):
                moments = self._page_in(self.state[param], device, group["optim_bits"], param.dtype)
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
                self._page_out(self.state[param], moments, group["optim_bits"])
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
        for param, state in restored.items():
            self.state[param] = state

    def _restore(self, name: str, value, param: torch.Tensor, key) -> torch.Tensor:
        value = value if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float32)
        if name == "step":
            return value.detach().to("cpu", torch.float32, copy=True)
        if not name.endswith("_absmax") and tuple(value.shape) != tuple(param.shape):
            raise CuraError(
                f"optimizer state '{name}' of parameter {key} has shape {tuple(value.shape)} but the parameter "
                f"has {tuple(param.shape)}; resume with the same model and LoRA settings"
            )
        return self._to_home(value.to(param.dtype) if name in _MOMENTS else value, param)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by every tensor in the optimizer's state (moments, quantization constants, steps)."""
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
