"""moss_linear: a frozen linear layer plus modality-routed LoRA (text) and ConvLoRA (image).

The math is docs/design.md section 1; :mod:`moss_kernels.reference` is its executable
specification. This file holds what all backends share:

* two ``torch.library`` custom ops in the ``moss`` namespace,

      moss::linear_fwd(x, W, b?, x_adapter?, A_t, B_t, A_i, B_i, route, nbr, nbr_t, s_t, s_i,
                       backend, dropout_mask?, dropout_scale)
          -> (y [N, D_out], z [N, R_t + R_i])
      moss::linear_bwd(dy, x?, W, x_adapter?, A_t, B_t, A_i, B_i, z, route, nbr_t, s_t, s_i,
                       need_dx, need_dW, need_db, need_dx_adapter, backend, dropout_mask?,
                       dropout_scale)
          -> (dx, dW, db, dx_adapter, dA_t, dB_t, dA_i, dB_i)  (empty: grads not asked for)

  with fake implementations (shapes only) and registered autograd, so ``torch.compile(
  fullgraph=True)`` traces through them without graph breaks and ``torch.library.opcheck``
  passes. ``backend`` is a plain string argument: the op body hands the call to that backend
  as one :class:`~moss_kernels.backends.LinearInputs` (the schemas stay flat, as torch.library
  needs them; below them the arguments travel by name).
  ``z`` (the routed rank-space activations, in the accumulation dtype) is the only
  intermediate the backward keeps: it costs N * (R_t + R_i) values, not N * D. It is the
  backend's own, read only by that backend's backward (the Triton backend's carries the
  adapter scales, the others' does not).
  ``nbr_t`` is an input of the forward op only so that the autograd context can keep it.

* ``x_adapter``: the adapters' own input (any tensor of x's shape):
  ``y = x W^T + b + expand(route(x_adapter A_all^T))``. The base GEMM reads x and the
  down-projection x_adapter, each once; the backward returns ``dx = dy W`` and
  ``dx_adapter = dP A_all`` apart (with x_adapter None, ``dx`` is their sum, as one GEMM). With a
  frozen weight and an x_adapter the backward does not read x, and the autograd context does
  not keep it.

* ``dropout_mask`` / ``dropout_scale``: LoRA dropout (what ``moss_linear(adapter_dropout=p)``
  passes): the adapters read ``x * dropout_mask * dropout_scale``, and ``dx = dy W + mask *
  scale * dP A_all``. The ``cpu`` backend reads the mask where its kernels read x (project, the
  dA outer product, the dx expand): dropout adds no pass over x and no tensor of x's size, only
  the mask, packed in bits (moss_kernels/dropout.py), which the autograd context keeps (1/32 of
  an fp32 x_adapter). Other backends get the masked input materialised (backends.forward /
  backward).

* :func:`moss_linear`, the public function: validates, flattens the leading dims of ``x``,
  picks the backend and calls the op.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backends, dropout
from .backends import LinearInputs, Needs
from .reference import accumulation_dtype
from .routing import RoutingPlan

__all__ = ["moss_linear"]


@torch.library.custom_op("moss::linear_fwd", mutates_args=())
def linear_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, x_adapter: Tensor | None, text_A: Tensor,
    text_B: Tensor, image_A: Tensor, image_B: Tensor, route: Tensor, nbr: Tensor,
    nbr_t: Tensor, text_scale: float, image_scale: float, backend: str,
    dropout_mask: Tensor | None = None, dropout_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    _check_dropout_mask(x_adapter, dropout_mask)
    return backends.forward(backends.implementation(backend), LinearInputs(
        x, weight, bias, x_adapter, text_A, text_B, image_A, image_B, route, nbr, nbr_t,
        text_scale, image_scale, dropout_mask, dropout_scale))


def _check_dropout_mask(x_adapter, dropout_mask) -> None:
    if dropout_mask is not None and x_adapter is not None:
        raise ValueError("dropout_mask: the adapters read x through it, so x_adapter must be "
                         "None; got both")


@linear_fwd.register_fake
def _linear_fwd_fake(x, weight, bias, x_adapter, text_A, text_B, image_A, image_B, route, nbr,
                     nbr_t, text_scale, image_scale, backend, dropout_mask=None,
                     dropout_scale=1.0):
    y = x.new_empty(x.shape[0], weight.shape[0])
    z = x.new_empty(x.shape[0], text_A.shape[0] + image_A.shape[0],
                    dtype=accumulation_dtype(x.dtype))
    return y, z


@torch.library.custom_op("moss::linear_bwd", mutates_args=())
def linear_bwd(
    dy: Tensor, x: Tensor | None, weight: Tensor, x_adapter: Tensor | None, text_A: Tensor,
    text_B: Tensor, image_A: Tensor, image_B: Tensor, z: Tensor, route: Tensor, nbr_t: Tensor,
    text_scale: float, image_scale: float, need_dx: bool, need_dweight: bool, need_dbias: bool,
    need_dx_adapter: bool, backend: str, dropout_mask: Tensor | None = None,
    dropout_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_backward_inputs(x, x_adapter, need_dweight, need_dx_adapter, dropout_mask)
    inputs = LinearInputs(x, weight, None, x_adapter, text_A, text_B, image_A, image_B, route,
                          None, nbr_t, text_scale, image_scale, dropout_mask, dropout_scale)
    grads = backends.backward(backends.implementation(backend), inputs, dy, z,
                              Needs(need_dx, need_dweight, need_dbias, need_dx_adapter))
    return tuple(grads)


def _check_backward_inputs(x, x_adapter, need_dweight, need_dx_adapter, dropout_mask) -> None:
    _check_dropout_mask(x_adapter, dropout_mask)
    if x is None and (x_adapter is None or need_dweight):
        raise ValueError("x: the backward reads it for dW, and for the adapters' gradients when "
                         "x_adapter is None; got None")
    if need_dx_adapter and x_adapter is None:
        raise ValueError("need_dx_adapter: True, but x_adapter is None (the adapters read x, "
                         "and dx carries their input gradient)")


@linear_bwd.register_fake
def _linear_bwd_fake(dy, x, weight, x_adapter, text_A, text_B, image_A, image_B, z, route, nbr_t,
                     text_scale, image_scale, need_dx, need_dweight, need_dbias, need_dx_adapter,
                     backend, dropout_mask=None, dropout_scale=1.0):
    _check_backward_inputs(x, x_adapter, need_dweight, need_dx_adapter, dropout_mask)
    # Dense row-major, as every backend returns them, whatever the inputs' strides (empty_like
    # of a column-major x would promise a column-major dx, and Inductor would read it so).
    def like(t):
        return t.new_empty(t.shape)

    def rows(need):  # [N, D_in] (x may be None), or empty; outputs never share memory
        return dy.new_empty(dy.shape[0], weight.shape[1]) if need else dy.new_empty(0)

    return (
        rows(need_dx),
        like(weight) if need_dweight else dy.new_empty(0),
        weight.new_empty(weight.shape[0]) if need_dbias else dy.new_empty(0),
        rows(need_dx_adapter),
        like(text_A), like(text_B), like(image_A), like(image_B),
    )


def _setup_context(ctx, inputs, output):
    (x, weight, bias, x_adapter, text_A, text_B, image_A, image_B, route, _nbr, nbr_t,
     text_scale, image_scale, backend, dropout_mask, dropout_scale) = inputs
    # dW reads x, and so do the adapters' gradients when they have no input of their own; else
    # x is not kept (a frozen layer with an x_adapter would keep an N x D_in tensor for nothing).
    # needs_input_grad is set before setup_context runs, eager and under torch.compile alike.
    keep_x = x_adapter is None or ctx.needs_input_grad[1]
    ctx.save_for_backward(x if keep_x else None, weight, x_adapter, text_A, text_B, image_A,
                          image_B, output[1], route, nbr_t, dropout_mask)
    ctx.scales = (text_scale, image_scale)
    ctx.backend = backend
    ctx.dropout_scale = dropout_scale


def _backward(ctx, dy, _dz):
    (x, weight, x_adapter, text_A, text_B, image_A, image_B, z, route, nbr_t,
     dropout_mask) = ctx.saved_tensors
    need = ctx.needs_input_grad
    # The incoming gradient may be expanded (stride 0, from y.sum()) or non-contiguous.
    dx, dw, db, dx_a, da_t, db_t, da_i, db_i = linear_bwd(
        dy.contiguous(), x, weight, x_adapter, text_A, text_B, image_A, image_B, z, route, nbr_t,
        *ctx.scales, need[0], need[1], need[2], need[3], ctx.backend, dropout_mask,
        ctx.dropout_scale,
    )
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None,
            dx_a if need[3] else None, da_t, db_t, da_i, db_i, None, None, None, None, None, None,
            None, None)


linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def moss_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: RoutingPlan,
    text_A: Tensor | None = None,
    text_B: Tensor | None = None,
    image_A: Tensor | None = None,
    image_B: Tensor | None = None,
    text_scale: float = 1.0,
    image_scale: float = 1.0,
    backend: str | None = None,
    *,
    x_adapter: Tensor | None = None,
    adapter_dropout: float = 0.0,
) -> Tensor:
    """``F.linear(x, weight, bias)`` plus the MOSS adapters, routed per token by ``plan``.

    Args:
        x: ``[..., D_in]``; the leading dims flatten to the plan's N tokens.
        weight, bias: the frozen layer, ``[D_out, D_in]`` and ``[D_out]`` (or None).
        plan: a :class:`RoutingPlan` for this batch layout, on ``x``'s device.
        text_A, text_B: text LoRA ``[R_t, D_in]``, ``[D_out, R_t]``; None for no text adapter.
        image_A, image_B: image ConvLoRA ``[R_i, D_in, K, K]`` (``nn.Conv2d`` weight layout,
            ``K = plan.kernel_size``), ``[D_out, R_i]``; None for no image adapter.
        text_scale, image_scale: ``alpha / r`` of each adapter.
        backend: ``reference``, ``cpu``, ``cuda``, ``triton`` or None (see
            :mod:`moss_kernels.backends`).
        x_adapter: what the adapters read instead of ``x`` (shape, dtype and device of ``x``);
            its gradient is the adapters' input gradient, ``x``'s the base layer's. None: the
            adapters read ``x``.
        adapter_dropout: LoRA dropout's probability ``p`` on the adapters' input (the base
            layer reads ``x`` as it is): each element of the adapters' ``x`` is zeroed with
            probability ``p``, the others scaled by ``1 / (1 - p)``, a new mask per call drawn
            from torch's generator (:func:`moss_kernels.dropout.dropout_mask`). Pass 0 in
            evaluation. The ``cpu`` backend applies the mask inside its kernels (no dropout
            pass over ``x``, nothing of ``x``'s size kept); others materialise it. Not with
            ``x_adapter``.

    Returns:
        ``[..., D_out]`` in ``x.dtype``; under ``torch.autocast`` for ``x``'s device, in the
        autocast dtype, as ``F.linear`` would return it.
    """
    _check_tensor("x", x)
    if (cast := _autocast_dtype(x)) is not None:
        x, weight, bias, x_adapter, text_A, text_B, image_A, image_B = (
            t.to(cast) if isinstance(t, Tensor) and t.dtype.is_floating_point else t
            for t in (x, weight, bias, x_adapter, text_A, text_B, image_A, image_B))
    _check_tensor("weight", weight, dtype=x.dtype, device=x.device, dims=(2,))
    d_out, d_in = weight.shape
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x: expected last dim D_in={d_in} (weight is [{d_out}, {d_in}]), got "
                         f"shape {tuple(x.shape)}")
    if x_adapter is not None:
        _check_tensor("x_adapter", x_adapter, dtype=x.dtype, device=x.device,
                      shape=tuple(x.shape))
    if (isinstance(adapter_dropout, bool) or not isinstance(adapter_dropout, (int, float))
            or not 0.0 <= adapter_dropout < 1.0):
        raise ValueError(f"adapter_dropout: expected a probability in [0, 1), got "
                         f"{adapter_dropout!r}")
    if adapter_dropout and x_adapter is not None:
        raise ValueError("adapter_dropout: the adapters read x through dropout, so x_adapter "
                         "must be None (apply the dropout to x_adapter yourself)")
    if bias is not None:
        _check_tensor("bias", bias, dtype=x.dtype, device=x.device, shape=(d_out,))
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan: expected a moss_kernels.RoutingPlan, got {type(plan).__name__}")
    if plan.device != x.device:
        raise ValueError(f"plan: on {plan.device} but x is on {x.device}; use plan.to(x.device)")
    k = plan.kernel_size
    text_A, text_B = _adapter("text", text_A, text_B, x, d_in, d_out, ())
    image_A, image_B = _adapter("image", image_A, image_B, x, d_in, d_out, (k, k))
    for name, scale in (("text_scale", text_scale), ("image_scale", image_scale)):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(scale).__name__}")
        # The expand GEMM multiplies the scaled B by every token's routed values, zeros
        # included, so a NaN scale would reach every token, padding too: refuse it.
        if not math.isfinite(scale):
            raise ValueError(f"{name}: expected a finite number, got {scale}")
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), d_in)  # not -1: D_in may be 0
    if x2.shape[0] != plan.num_tokens:
        raise ValueError(f"x: its leading dims {tuple(lead)} hold {x2.shape[0]} tokens but the "
                         f"plan was built for {plan.num_tokens} (layout {plan.shape})")
    xa2 = None if x_adapter is None else x_adapter.reshape(x2.shape)
    name = backends.resolve(backend, x.device.type, x.dtype)
    mask = dropout.dropout_mask(x2, adapter_dropout) if adapter_dropout else None
    y, _ = linear_fwd(x2, weight, bias, xa2, text_A, text_B, image_A, image_B, plan.route,
                      plan.nbr, plan.nbr_t, float(text_scale), float(image_scale), name, mask,
                      1.0 / (1.0 - adapter_dropout))
    return y.view(*lead, d_out)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a linear layer in on ``x``'s device, if it is on.

    Autocast does not reach inside a custom op, so the cast is done here, where F.linear's
    would be: every floating input goes to the autocast dtype (float64 stays float64, as
    autocast leaves it) and the op runs there, accumulating in fp32; the casts' backward
    returns each gradient in its parameter's own dtype (fp32 adapters get fp32 gradients).
    """
    device = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _check_tensor(name, t, dtype=None, device=None, dims=None, shape=None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} like x, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device} like x, got {t.device}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name}: expected {dims[0]} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def _adapter(kind, a, b, x, d_in, d_out, window):
    """Validate one adapter pair; an absent adapter becomes rank 0 (no work, no gradient)."""
    a_name, b_name = f"{kind}_A", f"{kind}_B"
    if (a is None) != (b is None):
        given, missing = (a_name, b_name) if b is None else (b_name, a_name)
        raise ValueError(f"{missing}: must be given together with {given} (or both None)")
    if a is None:
        return x.new_zeros(0, d_in, *window), x.new_zeros(d_out, 0)
    _check_tensor(a_name, a, dtype=x.dtype, device=x.device, dims=(2 + len(window),))
    r = a.shape[0]
    if tuple(a.shape[1:]) != (d_in, *window):
        what = "[R, D_in, K, K] with K = plan.kernel_size" if window else "[R, D_in]"
        want = ", ".join(str(v) for v in (r, d_in, *window))
        raise ValueError(f"{a_name}: expected {what} = [{want}], got {tuple(a.shape)}")
    _check_tensor(b_name, b, dtype=x.dtype, device=x.device, shape=(d_out, r))
    return a, b
