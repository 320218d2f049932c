"""Fully trainable extra modules (a head, a norm, an embedding, any sample-wise leaf) with exact per-sample gradients.

``make_per_sample(module)`` swaps the class of every supported leaf in place (state-dict keys and
``isinstance`` checks stay as they were). Without a DP engine the swapped modules run their ordinary
forward; under one, a custom autograd function computes each sample's gradient of every parameter (summing
token dims per sample) in the same backward, like the adapter layers, and never accumulates an unclipped
batch gradient into ``.grad``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from fedlora_fast import per_sample
from fedlora_fast.layers.ffa_linear import autocast_off, flat3
from fedlora_fast.reference import clip_coef, embedding_grad_sample, ffa_linear_clip_reduce


class _PerSampleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, *params):
        ctx.module, ctx.ps_ctx, ctx.batch_id = module, module.ps_ctx, module.ps_ctx.batch_id
        ctx.fwd = per_sample.forward_id(module.ps_ctx)
        ctx.autocast = _autocast_on(x)  # (the torch.func rule replays such a forward in its weights' dtype)
        ctx.save_for_backward(x, *params)
        return module.plain_forward(x)

    @staticmethod
    def backward(ctx, g):
        with per_sample.failing(ctx.ps_ctx), autocast_off(g):  # (float32 maths, also under torch.autocast)
            return _PerSampleFn._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        x, *_ = ctx.saved_tensors
        module = ctx.module
        # state goes on the module's own Parameters: saved tensors may unpack as other objects (checkpointing)
        params = module.ps_params()
        rule_kw = {} if module.ps_flat3 else {"autocast": ctx.autocast}  # (the torch.func rule's replay)
        dx = module.input_grad(x, g, **rule_kw) if ctx.needs_input_grad[0] else None
        grads = []
        nodes = per_sample.input_nodes(ctx, len(params))  # (the params are the apply's last tensor inputs)
        shaped = (flat3(x), flat3(g)) if module.ps_flat3 else (x, g)
        for p, node, ps in zip(params, nodes, module.per_sample_grads(*shaped, **rule_kw)):
            if not p.requires_grad or not per_sample.accumulates(node):  # (an input-only backward: nothing kept)
                grads.append(None)
                continue
            ps = ps if isinstance(ps, per_sample.Factors) else ps.float()
            norm2 = per_sample.squared_norms(ps)
            if ctx.ps_ctx.mode == per_sample.MODE_CLIP:
                coef = clip_coef(norm2, ctx.ps_ctx.threshold(p))
                if isinstance(ps, per_sample.Factors):
                    ps = ps.clip_reduce(coef)
                else:
                    ps = ffa_linear_clip_reduce(ps.reshape(ps.shape[0], 1, p.numel()), coef).reshape(p.shape)
            grads.append(per_sample.param_result(p, ctx.ps_ctx, ctx.batch_id, ps, norm2, ctx.fwd))
        return (dx, None, *grads)


def _apply(module: nn.Module, x: Tensor) -> Tensor:
    """The per-sample forward of ``module`` on ``x``: refuses an input that is a model's tensor rather than data
    (its rows are no samples), and returns a tensor of its own (a view, F.linear's on a 3-D input, could not
    be written in place, as audio models do to zero their padding)."""
    base = getattr(x, "_base", None)
    # (a parameter expanded over the batch, BLIP-2's query tokens or Perceiver's latents: each row is the
    # sample's own use of it, stride 0 along dim 0; a parameter itself, or a slice of one, has rows of its own)
    if isinstance(x, nn.Parameter) or (isinstance(base, nn.Parameter) and x.dim() > 0 and x.shape[0] > 1
                                       and x.stride(0) != 0):
        raise ValueError(
            f"{type(module).__name__}: its input is a parameter of the model, not the batch's data (DeBERTa's "
            "LayerNorm over its relative embeddings, say): its rows are no samples, so no per-sample gradient of it "
            "exists; leave it out of trainable_modules"
        )
    out = _PerSampleFn.apply(x, module, *module.ps_params())
    return out.clone() if out._is_view() else out


class _PerSampleMixin:
    ps_ctx: per_sample.PerSampleContext | None = None
    ps_flat3 = True  # per_sample_grads takes (n, T, features) views of the input and the output's gradient

    def __getstate__(self):  # a copy or a pickle is not under the DP engine (per_sample.state_for_copy)
        return per_sample.state_for_copy(self)

    def forward(self, x: Tensor) -> Tensor:
        if not per_sample.active(self.ps_ctx):
            return self.plain_forward(x)
        return _apply(self, x)

    def ps_params(self) -> list[Tensor]:
        """The parameters, in the order of ``per_sample_grads``'s results (an embedding has no bias)."""
        return [p for p in (self.weight, getattr(self, "bias", None)) if p is not None]


class PerSampleLinear(_PerSampleMixin, nn.Linear):
    """nn.Linear whose per-sample gradients are ``g_i^T x_i`` (weight) and ``sum_t g_i`` (bias).

    The weight's are kept as their factors g and x (``per_sample.Factors``: norms from (T, T) Gram matrices,
    the clipped sum one matrix product) where those take less memory than the (n, out, in) tensor: T (in + out)
    + T^2 < in out. A 32k x 4096 ``lm_head`` at 512 tokens keeps 0.5 GiB of g for 8 samples, not 3.9 GiB."""

    def plain_forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def input_grad(self, x: Tensor, g: Tensor) -> Tensor:
        return g @ self.weight.to(g.dtype)

    def per_sample_grads(self, x: Tensor, g: Tensor) -> list[Tensor | per_sample.Factors]:
        gf, xf = g.float(), x.float()
        T, out_f, in_f = g.shape[1], g.shape[2], x.shape[2]
        if T * (in_f + out_f) + T * T < in_f * out_f:  # (kept as g and x: a 32k-vocabulary lm_head, a long T)
            # (x copied if it is the caller's own tensor: changed in place before the step, it would be summed
            # under a norm taken from what it was)
            out = [per_sample.Factors([(gf, xf.clone() if xf is x else xf)], out_f)]
        else:
            out = [torch.einsum("nto,nti->noi", gf, xf)]
        if self.bias is not None:
            out.append(gf.sum(1))
        return out


class PerSampleLayerNorm(_PerSampleMixin, nn.LayerNorm):
    """nn.LayerNorm (last-dim) whose per-sample gradients are ``sum_t g * x_hat`` and ``sum_t g``."""

    def plain_forward(self, x: Tensor) -> Tensor:
        return nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def input_grad(self, x: Tensor, g: Tensor) -> Tensor:
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            w = self.weight.detach() if self.weight is not None else None
            b = self.bias.detach() if self.bias is not None else None
            y = nn.functional.layer_norm(xd, self.normalized_shape, w, b, self.eps)
            return torch.autograd.grad(y, xd, g)[0]

    def per_sample_grads(self, x: Tensor, g: Tensor) -> list[Tensor]:
        xf, gf = x.float(), g.float()
        x_hat = nn.functional.layer_norm(xf, self.normalized_shape, None, None, self.eps)
        out = []
        if self.weight is not None:
            out.append((gf * x_hat).sum(1))
        if self.bias is not None:
            out.append(gf.sum(1))
        return out


class PerSampleEmbedding(_PerSampleMixin, nn.Embedding):
    """nn.Embedding whose per-sample gradient of the table is ``sum_t onehot(id_t) g_t`` (the padding row stays
    zero, as torch leaves it).

    Sparse: a backward keeps each sample's looked-up ids and their rows' gradients (``per_sample.Factors``:
    n x T x embedding_dim float32), not the dense (n, num_embeddings, embedding_dim) tensor opacus's sampler
    builds (n x 47 MB for a 30k x 384 table); the norms and the clipped sum are computed from them exactly
    (``fedlora_fast.reference.ghost``). A tied ``lm_head`` adds its own factors (g, x) to the same tensor's
    (``Factors.__add__``); its norms then take (T, T) Gram matrices. ``max_norm`` (the forward rewrites
    looked-up rows of the weight in place, a change no noise covers), ``scale_grad_by_freq`` (each token's
    gradient scaled by its count in the whole batch: one sample's gradient would depend on the others) and
    ``sparse`` are refused (``per_sample_problems``).
    """

    def plain_forward(self, x: Tensor) -> Tensor:
        return nn.functional.embedding(x, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                                       self.scale_grad_by_freq, self.sparse)

    def input_grad(self, x: Tensor, g: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__}: its input (token ids, {x.dtype}) has no gradient")

    def per_sample_grads(self, x: Tensor, g: Tensor) -> list[Tensor | per_sample.Factors]:
        n, T, d = g.shape  # (flat3: (n, T, d); flat3 folded the ids as it folds features, so take T from g)
        ids = x.reshape(n, T).to(torch.long, copy=True)  # (a copy: the caller may refill its id buffer)
        gf = g.float()
        if self.padding_idx is not None:
            gf = gf.masked_fill((ids == self.padding_idx).unsqueeze(-1), 0.0)
        if T * (d + 2) >= self.num_embeddings * d:  # (a table of few rows, BERT's token types: dense is smaller)
            return [embedding_grad_sample(ids, gf, self.num_embeddings)]
        return [per_sample.Factors([(ids, gf)], self.num_embeddings)]


_SWAPS: dict[type, type] = {nn.Linear: PerSampleLinear, nn.LayerNorm: PerSampleLayerNorm,
                            nn.Embedding: PerSampleEmbedding}


class _PerSampleFunctional(_PerSampleMixin):
    """Any other leaf with parameters (an RMSNorm of any model family, GPT-2's Conv1D, GroupNorm, a convolution):
    each sample's gradient is the vector-Jacobian product of the module's own forward on that sample alone
    (``torch.func.vmap`` over ``torch.func.vjp``), for every parameter of the module itself. It runs in the
    module's own dtypes, as its forward did (the function can depend on them: ``nn.RMSNorm``'s default eps is
    the input dtype's; a forward under autocast is replayed in the weights' dtype), and the results are kept in
    float32 as every per-sample gradient is.

    That is exact when the module treats samples independently. Until a backward of two or more finite samples
    with a non-zero gradient has checked it (``_check_separable``: outputs and input gradients row by row,
    parameter gradients summed, each sample alone against the batch), a module that mixes samples is refused
    (per-sample gradients of another function than the one trained). Called with one tensor only."""

    ps_flat3 = False
    _ps_plain = False  # set while torch.func traces the module's own forward (no per-sample Function inside)
    _ps_checked = False

    def forward(self, *args, **kwargs):
        if self._ps_plain or not per_sample.active(self.ps_ctx):
            return self.plain_forward(*args, **kwargs)
        if len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
            raise TypeError(
                f"{type(self).__name__}: a module trained with per-sample gradients through torch.func takes one "
                f"tensor, got {len(args)} positional argument(s) and keywords {sorted(kwargs)}"
            )
        return _apply(self, args[0])

    def plain_forward(self, *args, **kwargs):
        return _base_of(type(self)).forward(self, *args, **kwargs)

    def ps_params(self) -> list[Tensor]:
        return list(self.parameters(recurse=False))

    def _func_call(self, params: dict, x: Tensor) -> Tensor:
        self._ps_plain = True
        try:  # (buffers as they are: an embedding's scale, a norm's running statistics are not trained)
            return torch.func.functional_call(self, {**dict(self.named_buffers(recurse=False)), **params}, (x,),
                                              strict=True)
        finally:
            self._ps_plain = False

    def _replay_input(self, x: Tensor, autocast: bool) -> Tensor:
        """The input the replay runs on. A forward under autocast ran some ops in a lower precision on inputs
        and weights of mixed dtypes; the replay runs without autocast, so it takes the input in the parameters'
        widest dtype (the function autocast approximated; replayed under autocast, ops such as group norm's
        backward met mixed dtypes inside torch.func). Without autocast: as the forward ran."""
        x = x.detach()
        if autocast and x.is_floating_point():
            wide = max((p.dtype for p in self.parameters(recurse=False) if p.is_floating_point()),
                       key=lambda d: torch.finfo(d).bits, default=x.dtype)
            x = x.to(wide)
        return x

    def input_grad(self, x: Tensor, g: Tensor, autocast: bool = False) -> Tensor:
        params = {n: p.detach() for n, p in self.named_parameters(recurse=False)}
        out, vjp = torch.func.vjp(lambda xx: self._func_call(params, xx), self._replay_input(x, autocast))
        return vjp(g.to(out.dtype))[0].to(x.dtype)

    def per_sample_grads(self, x: Tensor, g: Tensor, autocast: bool = False) -> list[Tensor]:
        params = {n: p.detach() for n, p in self.named_parameters(recurse=False)}
        names = list(params)
        x = self._replay_input(x, autocast)

        def grads_of(xs: Tensor, gs: Tensor) -> tuple:
            out, vjp = torch.func.vjp(lambda ps: self._func_call(ps, xs), params)
            grads = vjp(gs.to(out.dtype))[0]
            return tuple(grads[n] for n in names)

        try:
            ps = torch.func.vmap(lambda xi, gi: grads_of(xi.unsqueeze(0), gi.unsqueeze(0)))(x, g)
            if not self._ps_checked and x.shape[0] >= 2 and not _capturing(x):
                self._check_separable(x, g, params, ps, grads_of(x, g))
        except PerSampleRuleError:
            raise
        except Exception as e:  # (vmap's own errors name torch internals, not the module)
            raise PerSampleRuleError(
                f"{type(self).__name__}: its per-sample gradients through torch.func failed ({type(e).__name__}: "
                f"{str(e)[:300]}); the module's forward must treat samples independently and draw no random "
                "numbers (dropout): leave it out of trainable_modules"
            ) from e
        return list(ps)

    def _check_separable(self, x: Tensor, g: Tensor, params: dict, ps: tuple, batch: tuple) -> None:
        """Each sample alone against the batch, once: the outputs row by row (a forward that mixes samples,
        detached or not), the parameters' gradients summed, and the input's gradient row by row (a mixing that
        only the backward shows, ahead of this module). Tolerances: a few units in the last place of the lowest
        precision at work (the replay's input's, the parameters'), relative to each element's terms."""
        # the lowest precision at work; its absolute floor too (bf16 rounds a near-cancelling bias + xW to 0 on
        # one path and to 2e-3 on the other)
        low = max((d for d in (x.dtype, *(p.dtype for p in params.values())) if d.is_floating_point),
                  key=lambda d: torch.finfo(d).eps, default=torch.float32)
        rtol = 1e-4 if torch.finfo(low).bits >= 32 else 5e-2
        floor = 8 * max(torch.finfo(low).eps, torch.finfo(torch.float32).eps)
        forward = functools.partial(self._func_call, params)
        checks = [("its output", torch.func.vmap(lambda xi: forward(xi.unsqueeze(0))[0])(x), forward(x))]
        if x.is_floating_point():
            def dx_alone(xi: Tensor, gi: Tensor) -> Tensor:
                out, vjp = torch.func.vjp(forward, xi.unsqueeze(0))
                return vjp(gi.unsqueeze(0).to(out.dtype))[0][0]

            out_batch, vjp = torch.func.vjp(forward, x)
            checks.append(("its input's gradient", torch.func.vmap(dx_alone)(x, g), vjp(g.to(out_batch.dtype))[0]))
        checks = [(what, each, whole, each.abs()) for what, each, whole in checks]
        checks += [(f"the gradient of {n!r}", one.sum(0), whole, one.abs().sum(0))
                   for n, one, whole in zip(params, ps, batch)]
        if not all(bool(torch.isfinite(t).all()) for _, each, whole, _ in checks for t in (each, whole)):
            return  # a non-finite sample (dropped by the engine) proves nothing either way: checked later
        for what, each, whole, size in checks:
            size = size.double()
            if each.shape != whole.shape or not bool(
                    ((each.double() - whole.double()).abs() <= rtol * size + floor * (1 + size.max())).all()):
                raise PerSampleRuleError(
                    f"{type(self).__name__}: {what}, for each sample alone, differs from the batch's: its forward "
                    "mixes samples, so no per-sample gradient of it exists; leave it out of trainable_modules"
                )  # (no figures: they are statistics of the data)
        if any(bool(whole.ne(0).any()) for whole in batch):  # (an all-zero gradient proves nothing: checked later)
            self._ps_checked = True


class PerSampleRuleError(RuntimeError):
    """A module trained through the torch.func rule whose per-sample gradients cannot be computed or are wrong."""


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _autocast_on(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (at the forward)."""
    device_type = x.device.type
    return (device_type != "meta" and torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type))


_FUNCTIONAL: dict[type, type] = {}  # base class -> its per-sample subclass (one per class, made on first use)
_FUNCTIONAL_PREFIX = "PerSampleOf:"


def _functional_name(base: type) -> str:
    # pickle finds a class by module and dotted qualname: this name has no dot (module __getattr__ resolves it)
    return f"{_FUNCTIONAL_PREFIX}{base.__module__.replace('.', '/')}:{base.__qualname__.replace('.', '/')}"


def _functional_class(base: type) -> type:
    cls = _FUNCTIONAL.get(base)
    if cls is None:
        name = _functional_name(base)
        short = f"PerSample{'Functional' if base in _SWAPS else ''}{base.__name__}"  # (not the built-in's name)
        cls = type(short, (_PerSampleFunctional, base), {"__module__": __name__, "__qualname__": name})
        cls._ps_base = base
        _FUNCTIONAL[base] = cls
    return cls


def _base_of(cls: type) -> type:
    return cls._ps_base


def __getattr__(name: str):
    """Resolve a pickled ``_functional_class`` by its ``_functional_name`` (the class is made on first use)."""
    if name.startswith(_FUNCTIONAL_PREFIX):
        import importlib

        mod, _, qual = name[len(_FUNCTIONAL_PREFIX):].partition(":")
        base = importlib.import_module(mod.replace("/", "."))
        for part in qual.split("/"):
            base = getattr(base, part)
        return _functional_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _builtin_rule(sub: nn.Module) -> bool:
    """Whether a rule of ``_SWAPS`` computes ``sub``'s gradients: its exact type, and its own parameters are
    the rule's ``weight`` (and ``bias``). Under the old ``nn.utils.weight_norm`` the weight is computed from
    ``weight_g`` and ``weight_v``, which the rule would leave without a gradient: those go through torch.func."""
    if type(sub) not in _SWAPS:
        return False
    own = dict(sub.named_parameters(recurse=False))
    return isinstance(getattr(sub, "weight", None), nn.Parameter) and set(own) <= {"weight", "bias"}


def _functional_problem(sub: nn.Module) -> str | None:
    """Why the torch.func rule cannot take ``sub`` (a leaf with parameters and no built-in rule), or None."""
    parametrize = torch.nn.utils.parametrize
    if parametrize.is_parametrized(sub) or isinstance(sub, parametrize.ParametrizationList):
        return "a parametrized tensor"
    from torch.nn.utils.spectral_norm import SpectralNorm  # (torch.nn.utils.spectral_norm is the function)

    if any(isinstance(h, SpectralNorm) for h in sub._forward_pre_hooks.values()):
        return "spectral_norm: its forward runs a power iteration that updates buffers in place"
    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
        return "batch norm: its batch statistics mix the samples"
    if isinstance(sub, nn.RNNBase):
        return "a recurrent layer: sequence-first by default, no per-sample rule"
    if isinstance(sub, nn.MultiheadAttention) or any(True for c in sub.children() for _ in c.parameters()):
        return "its own parameters beside submodules with parameters"
    if not all(p.is_floating_point() for p in sub.parameters(recurse=False)):
        return "a parameter that is not floating point"
    return None


def per_sample_problems(module: nn.Module, name: str = "") -> list[str]:
    """The parameterised leaves of ``module`` with no per-sample rule, each as ``"name (why)"``.

    Separate from ``make_per_sample`` so that callers that also inject or swap modules (``inject_adapters``,
    ``load_peft``, ``from_peft``) can refuse before changing anything.
    """
    unsupported = []
    for sub_name, sub in module.named_modules():
        if not any(True for _ in sub.parameters(recurse=False)):
            continue
        full = ".".join(filter(None, [name, sub_name]))
        if isinstance(sub, nn.LayerNorm) and len(sub.normalized_shape) != 1:
            unsupported.append(f"{full} (LayerNorm over {tuple(sub.normalized_shape)}: "
                               "per-sample rule for one normalised dim only)")
        elif isinstance(sub, nn.Embedding) and (sub.max_norm is not None or sub.scale_grad_by_freq or sub.sparse):
            why = ("max_norm (its forward renormalises the looked-up rows of the weight in place)"
                   if sub.max_norm is not None else
                   "scale_grad_by_freq (a token's gradient scaled by its count in the whole batch)"
                   if sub.scale_grad_by_freq else "sparse=True")
            unsupported.append(f"{full} (Embedding with {why}: no per-sample rule)")
        elif not isinstance(sub, _PerSampleMixin) and not _builtin_rule(sub):
            why = _functional_problem(sub)
            if why is not None:
                unsupported.append(f"{full} ({type(sub).__name__}: {why})")
    return unsupported


def per_sample_error(unsupported: list[str], what: str = "trainable_modules") -> TypeError:
    """The error for ``per_sample_problems``; ``what`` names where the modules came from (an argument, a file)."""
    return TypeError(
        f"{what}: no per-sample gradient rule for " + ", ".join(unsupported)
        + f"; rules of their own: {', '.join(t.__name__ for t in _SWAPS)}; any other leaf with parameters goes "
        "through torch.func if it treats samples independently and has no submodule with parameters"
    )


def make_per_sample(module: nn.Module, name: str = "", *, what: str = "trainable_modules") -> list[nn.Module]:
    """Make every parameterised leaf of ``module`` compute per-sample gradients; unfreeze its parameters.

    Args:
        what: the argument (or source) the module came from, named in the error.
    Returns:
        The swapped leaves.
    Raises:
        TypeError: a leaf with parameters has no per-sample rule (its name and type are listed); nothing
            is changed then.
    """
    unsupported = per_sample_problems(module, name)
    if unsupported:
        raise per_sample_error(unsupported, what)
    leaves = [sub for sub in module.modules() if any(True for _ in sub.parameters(recurse=False))]
    for sub in leaves:
        if not isinstance(sub, _PerSampleMixin):
            sub.__class__ = _SWAPS[type(sub)] if _builtin_rule(sub) else _functional_class(type(sub))
        sub.ps_ctx = None
        for p in sub.parameters():
            p.requires_grad_(True)
    return leaves
