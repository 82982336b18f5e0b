"""AdamW for bf16 weights that keeps fp32's update: `BF16AdamW`.

With `precision: bf16` the model's weights and gradients are bf16 (no fp32 copy cast on every
forward, half the gradient memory). Plain AdamW on bf16 weights loses the update: at DPO's lr
of 1e-6, a step moves a weight of 0.05 by ~1e-6, far below bf16's resolution there (2e-4), so
round-to-nearest writes back the old weight. This optimizer keeps, per parameter:

- a bf16 Kahan compensation buffer: what rounding the new weight to bf16 lost is kept and added
  to the next update, so updates far below bf16's resolution accumulate until they move the
  weight (the approach of torchdistx's AnyPrecisionAdamW). Weight and compensation together
  carry ~16 significant bits. An exact fp32 master in 2 extra bytes (the bf16 weight as the
  upper half of its bits, the optimizer keeping the lower half) was built and measured first:
  the int16 copies it needs run 5-10x slower than float conversions on this CPU, which made the
  step 5x slower than torch's fused fp32 AdamW; a separate fp32 copy would cost 4 bytes.
- both moments in bf16. `exp_avg_sq` is written with stochastic rounding: its per-step change
  (1 - β2 = 1e-3 of itself) is below bf16's half-ulp (2^-9), so round-to-nearest would freeze
  it; stochastic rounding keeps its expected value. `exp_avg` (change 1 - β1 = 0.1) rounds to
  nearest.

Bytes per trainable parameter: weight 2 + gradient 2 + compensation 2 + moments 2 + 2 = 10, against
16 for fp32 weights, gradients and fp32 AdamW moments.

`bf16_moments=True` gives fp32 weights the same bf16 moments (`bf16_moments: true` in a
training config): the weight and its update stay exact fp32 (torch's fused AdamW kernel runs on
fp32 copies of the moments, a chunk at a time), only the two moments are stored in bf16, rounded
as above: 4 + 4 + 2 + 2 = 12 bytes per parameter instead of 16 (135M parameters: -0.54 GB). The math runs in fp32 on chunks of
`CHUNK` elements, so temporaries stay small and in cache. torchao's CPU-capable optimizers were
measured instead and not used (see `benchmarks/README.md`): they compile every parameter shape
with torch.compile (a C++ toolchain at run time; 38 s for the first 8-bit step of one shape).

`grad_scale` (a 0-dim tensor, or None) divides every gradient as it is read: the global-norm
clipping factor, as with torch's fused AdamW (`training.loop.clip_and_step`).
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 16  # elements per fp32 working chunk (256 KiB per temporary: four fit in L2)
_LOW = 0xFFFF


def stochastic_round_(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Round fp32 `x` in place to a bf16-representable value, up or down with probability
    proportional to the distance (`noise`: uniform int32 in [0, 65536), x's shape)."""
    bits = x.view(torch.int32)
    bits.add_(noise).bitwise_and_(~_LOW)
    return x


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) for bf16 parameters; see the module doc.
    fp32 parameters (e.g. kept in fp32 on purpose) get no compensation, and fp32 moments unless
    `bf16_moments`."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0, bf16_moments: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.bf16_moments = bf16_moments
        self.grad_scale: torch.Tensor | None = None
        self.seed = seed
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups
                                                   for p in g["params"])}
        # One block of uniform noise; each chunk reads it at an offset drawn from (seed, step,
        # parameter, chunk), so an element's rounding noise differs from step to step at the
        # cost of one small draw, and a resumed run rounds exactly as an uninterrupted one.
        gen = torch.Generator().manual_seed(seed)
        self._noise = torch.randint(0, 1 << 16, (2 * CHUNK,), dtype=torch.int32, generator=gen)

    def _state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            dtype = self._moment_dtype(p)
            st["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype,
                                                memory_format=torch.preserve_format)
            if p.dtype == torch.bfloat16:
                st["comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _moment_dtype(self, p: torch.Tensor) -> torch.dtype:
        if p.dtype == torch.bfloat16 or (self.bf16_moments and p.dtype == torch.float32):
            return torch.bfloat16
        return p.dtype

    def load_state_dict(self, state_dict) -> None:
        """torch's loader casts every floating-point state tensor to its parameter's dtype,
        which would turn bf16 moments of fp32 weights back into fp32 on resume (4 more bytes a
        parameter from then on); they are cast back (exactly: they were bf16 when saved)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                for key in ("exp_avg", "exp_avg_sq"):
                    if st and key in st and st[key].dtype != self._moment_dtype(p):
                        st[key] = st[key].to(self._moment_dtype(p))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inv = None if self.grad_scale is None else float(1.0 / self.grad_scale)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group, inv)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict, inv_scale: float | None = None) -> None:
        """Update one parameter from its gradient (also the per-parameter hook's entry)."""
        st = self._state(p)
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if p.dtype != torch.bfloat16:  # fp32 (or other) parameters: torch's fused kernel
            scale = None if inv_scale is None else torch.tensor(1.0 / inv_scale)
            st["step"] += 1  # the kernel reads the step count, as torch.optim's AdamW does
            kw = dict(lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=eps, amsgrad=False,
                      maximize=False, grad_scale=scale)
            if st["exp_avg"].dtype == p.dtype:
                torch._fused_adamw_([p], [p.grad], [st["exp_avg"]], [st["exp_avg_sq"]], [],
                                    [st["step"]], **kw)
            else:
                self._fp32_step_bf16_moments(p, st, kw)
            return
        st["step"] += 1
        t = float(st["step"])
        step_size = lr / (1 - b1 ** t)
        bc2_sqrt = math.sqrt(1 - b2 ** t)
        flat = (p.view(-1), p.grad.reshape(-1), st["exp_avg"].view(-1),
                st["exp_avg_sq"].view(-1), st["comp"].view(-1))
        n = flat[0].numel()
        ws = self._workspace(p.device)
        offsets = self._noise_offsets(p, int(t), n)
        for k, s in enumerate(range(0, n, CHUNK)):
            w, g16, m16, v16, c16 = (x[s:s + CHUNK] for x in flat)
            L = w.numel()
            g, m, v, old = (b[:L] for b in ws)  # fp32 scratch: no allocation per chunk
            g.copy_(g16)
            if inv_scale is not None:
                g.mul_(inv_scale)
            m.copy_(m16).lerp_(g, 1 - b1)
            m16.copy_(m)
            v.copy_(v16).mul_(b2).addcmul_(g, g, value=1 - b2)
            o = int(offsets[k])
            # the rounded copy goes through `old`'s buffer, free until the weight is read
            v16.copy_(stochastic_round_(old.copy_(v), self._noise[o:o + L]))
            u = torch.div(m, v.sqrt_().div_(bc2_sqrt).add_(eps), out=g).mul_(-step_size)
            old.copy_(w)
            if wd:
                u.add_(old, alpha=-lr * wd)
            u.add_(m.copy_(c16))  # + what earlier roundings of the weight lost
            w.copy_(torch.add(old, u, out=m))  # round to nearest bf16
            c16.copy_(u.sub_(v.copy_(w).sub_(old)))  # intended - applied change

    def _fp32_step_bf16_moments(self, p: torch.Tensor, st: dict, kw: dict) -> None:
        """fp32 weight, bf16 moments: the fused kernel on fp32 copies of the moments, one chunk
        at a time; the moments are written back rounded (exp_avg to nearest, exp_avg_sq
        stochastically, as for bf16 weights)."""
        w_flat, g_flat = p.view(-1), p.grad.reshape(-1)
        m_flat, v_flat = st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1)
        n = w_flat.numel()
        ws = self._workspace(p.device)
        offsets = self._noise_offsets(p, int(st["step"]), n)
        for k, s in enumerate(range(0, n, CHUNK)):
            w, g = w_flat[s:s + CHUNK], g_flat[s:s + CHUNK]
            m16, v16 = m_flat[s:s + CHUNK], v_flat[s:s + CHUNK]
            L = w.numel()
            m, v = ws[0][:L].copy_(m16), ws[1][:L].copy_(v16)
            torch._fused_adamw_([w], [g], [m], [v], [], [st["step"]], **kw)
            m16.copy_(m)
            o = int(offsets[k])
            v16.copy_(stochastic_round_(v, self._noise[o:o + L]))

    def _noise_offsets(self, p: torch.Tensor, step: int, n: int) -> torch.Tensor:
        """Where each CHUNK of `p`'s n elements reads the noise block at this step: a function
        of (seed, step, parameter) only, so a resumed run rounds as an uninterrupted one."""
        gen = torch.Generator().manual_seed(
            hash((self.seed, step, self._index.get(p, 0))) & (2**63 - 1))
        return torch.randint(0, CHUNK, ((n + CHUNK - 1) // CHUNK,), generator=gen)

    def _workspace(self, device) -> list[torch.Tensor]:
        """Four fp32 buffers of CHUNK elements, allocated once: a fresh temporary per chunk
        costs more than the math (large allocations are new pages, each faulted in)."""
        ws = getattr(self, "_ws", None)
        if ws is None or ws[0].device != torch.device(device):
            ws = self._ws = [torch.empty(CHUNK, dtype=torch.float32, device=device)
                             for _ in range(4)]
        return ws


def attach_in_backward(opt: BF16AdamW) -> list:
    """Step each parameter from a hook that runs when its gradient is complete, then free the
    gradient: no gradient is kept for the whole model (the torchtune approach). The learning
    rate is read from the parameter's group at that moment, so a scheduler works as usual; the
    caller's optimizer.step() finds no gradients and does nothing. Returns the hook handles."""
    group_of = {p: g for g in opt.param_groups for p in g["params"]}

    def hook(p: torch.Tensor) -> None:
        opt.step_param(p, group_of[p])
        p.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for p in group_of]


def bytes_per_param(precision: str, bf16_moments: bool = False) -> int:
    """Weights + gradients + optimizer state per trainable parameter, by precision mode (bf16
    weights always keep bf16 moments; `bf16_moments` halves fp32 weights' moments)."""
    full = {"fp32": 16, "bf16-mixed": 16, "fp16-mixed": 16, "bf16": 10}[precision]
    return full - 4 if bf16_moments and precision != "bf16" else full
