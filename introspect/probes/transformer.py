"""The transformer pack: attention entropy and logit growth, massive activations in the residual
stream, and output-logit divergence, each on logging steps only.

Attention is seen through a :class:`torch.overrides.TorchFunctionMode` entered for the root's
forward on logging steps (never off the cadence: zero cost there). It sees each
``F.scaled_dot_product_attention`` call (Hugging Face's default ``sdpa`` attention) and each
``F.multi_head_attention_forward`` (``nn.MultiheadAttention`` in training; the calls nested in it
are not dispatched to the mode again). The call itself runs unchanged, so its output is bitwise
the same; the logits are then recomputed, without gradients, on at most ``SAMPLED_ROWS`` evenly
spaced query rows (no random numbers: the run's RNG stream is untouched), with the call's mask,
causal flag and scale. Attention modules and blocks often own no parameters (``GPT2Attention``,
``GPT2Block``), so the default selection does not watch them: this pack hooks them itself, for the
logging step only. Under ``torch.compile`` a function mode or per-step hooks would make the
compiled code recompile: the block probe stays off, and the attention probe runs the logging
step's forward once more, eagerly and without gradients, with its mode and hooks on for that
rerun only.

Eager attention (Hugging Face's ``attn_implementation="eager"``, timm's non-fused attention,
``softmax(q @ k.T / sqrt(d))`` by hand) is a softmax over the last dimension of a score tensor
of 3 or more dimensions, inside a module that looks like attention: the mode sees the softmax and
reads its input, the scaled and masked logits, on the same sampled rows.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..debugger.alerts import Alert
from ..debugger.baselines import Baselines, Shift
from ..errors import IntrospectWarning, warn
from ..records.step import HostStep
from ..records.tags import attention_tag
from ..runtime.preserved import cuda_devices, preserved_state
from ..runtime.selection import root_name
from .base import Probe, ProbeContext, StepPlan
from .nonfinite.replay import ForwardRecord, capture_forward, eager_stance, run_forward
from .nonfinite.sentinel import replay_possible

__all__ = ["AttentionProbe", "MassiveActivations", "LogitDivergence", "SAMPLED_ROWS", "repeated_blocks"]

SAMPLED_ROWS = 64
"""Query rows per head whose logits are recomputed (evenly spaced over the sequence)."""
MEDIAN_SAMPLE = 1 << 20
"""A block output is subsampled (strided) to this many values for its median |x|."""

_MHA_PARAMS = list(inspect.signature(F.multi_head_attention_forward).parameters)
_SDPA_PARAMS = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]


def _bind(names: list[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    allowed: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head (max logit, mean softmax entropy in nats, mean normalised entropy) of sampled
    query rows (see :func:`logit_stats`).

    ``q``: (B, H, r, d) sampled rows; ``k``: (B, H, S, d); ``allowed``: bool, broadcastable to
    (B, H, r, S), False where a key is masked out; ``bias``: an additive float mask (ALiBi, padding
    as -inf) on the same shape. The max is over the positions a query may attend to."""
    logits = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    scores = logits if bias is None else logits + bias.float()
    return logit_stats(logits, scores, allowed)


def score_stats(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same statistics from the input of eager attention's softmax: the scaled logits with the
    mask already added, (B, H, L, S) (a 3-D (B, L, S) is one head; more dimensions between B and
    L are heads too). A masked position holds -inf or a huge negative number (Hugging Face adds
    ``finfo(dtype).min``): below half the dtype's lowest value it is no logit, and is left out."""
    s = scores.detach()
    s = s.unsqueeze(1) if s.dim() == 3 else s.flatten(1, -3) if s.dim() > 4 else s
    s = s.index_select(-2, _rows(s.shape[-2], s.device)).float()
    return logit_stats(s, s, s > torch.finfo(scores.dtype).min / 2)


def logit_stats(
    logits: torch.Tensor, scores: torch.Tensor, allowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head (max of ``logits``, mean entropy of softmax(``scores``), mean normalised entropy)
    over (B, H, r, S) rows, where ``allowed`` (and a finite score) says a query may attend to a key.

    The normalised entropy is each row's entropy over log of the number of keys that row may
    attend to (1: uniform, 0: one key), averaged over the rows with two keys or more: under a
    causal mask query i sees i + 1 keys, so raw nats mix short and long rows; the baseline
    (:class:`introspect.debugger.baselines.Baselines`) compares this one across steps."""
    ok = torch.isfinite(scores)
    if allowed is not None:
        ok = ok & allowed
    neg = torch.tensor(float("-inf"), device=logits.device)
    max_logit = torch.where(ok, logits, neg).amax(dim=(0, 2, 3))
    p = torch.softmax(torch.where(ok, scores, neg), dim=-1)
    entropy = torch.special.entr(p).nan_to_num(0.0).sum(-1)  # (B, H, r); entr(0) = 0
    rows = ok.any(-1).expand_as(entropy).float()  # a fully masked row has no distribution
    counted = rows.sum(dim=(0, 2))
    # A head with no row to read (every score NaN: a NaN step) has no entropy, not 0 (a collapse).
    mean_entropy = torch.where(counted > 0, (entropy * rows).sum(dim=(0, 2)) / counted.clamp_min(1), math.nan)
    keys = ok.sum(-1).expand_as(entropy).float()
    several = (keys > 1).float()
    normalised = entropy / keys.clamp_min(2).log()
    n_several = several.sum(dim=(0, 2))
    mean_normalised = torch.where(
        n_several > 0, (normalised * several).sum(dim=(0, 2)) / n_several.clamp_min(1), math.nan
    )
    # Statistics over non-finite logits are not measurable, not a verdict: a head with a NaN or +Inf
    # logit anywhere (a NaN step; NaN scores also fail ``allowed`` and would silently shrink the rows
    # to a key or two, i.e. a fake collapse), or with no finite logit at all, gets NaN for all three.
    bad = (_nonfinite_heads(logits) + _nonfinite_heads(scores)) > 0
    bad = bad | ~torch.isfinite(max_logit)
    nan = torch.tensor(math.nan, device=logits.device)
    return (
        torch.where(bad, nan, max_logit),
        torch.where(bad, nan, mean_entropy),
        torch.where(bad, nan, mean_normalised),
    )


def _nonfinite_heads(x: torch.Tensor) -> torch.Tensor:
    """Per head (dimension 1 of (B, H, r, S)): how many values are NaN or +Inf (-Inf is a mask)."""
    return (torch.isnan(x) | torch.isposinf(x)).sum(dim=(0, 2, 3))


def _rows(length: int, device: torch.device) -> torch.Tensor:
    return torch.linspace(0, length - 1, min(length, SAMPLED_ROWS), device=device).round().long()


def _rows_of(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The sampled query rows of a mask broadcastable to (..., L, S)."""
    return mask if mask.dim() < 2 or mask.shape[-2] == 1 else mask.index_select(-2, rows)


def _split_mask(mask: torch.Tensor | None, masked_is_true: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(allowed, bias) of a bool or additive float mask."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return (~mask if masked_is_true else mask), None
    return None, mask


def _causal(rows: torch.Tensor, keys: int) -> torch.Tensor:
    """SDPA's ``is_causal``: query i sees keys j <= i (top-left aligned)."""
    return torch.arange(keys, device=rows.device)[None, :] <= rows[:, None]


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a & b


def sdpa_stats(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stats of one ``F.scaled_dot_product_attention(query, key, ...)`` call."""
    a = _bind(_SDPA_PARAMS, args, kwargs)
    q, k = a["query"].detach(), a["key"].detach()
    if q.dim() == 3:
        q, k = q.unsqueeze(1), k.unsqueeze(1)
    if a.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = a.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    rows = _rows(q.shape[-2], q.device)
    mask = a.get("attn_mask")
    allowed, bias = _split_mask(None if mask is None else _rows_of(mask.detach(), rows), masked_is_true=False)
    if a.get("is_causal"):
        allowed = _and(allowed, _causal(rows, k.shape[-2]))
    return attention_stats(q.index_select(-2, rows), k, scale, allowed, bias)


def mha_stats(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stats of one ``F.multi_head_attention_forward`` call, from its in-projection weights
    (``query``/``key`` are (L, N, E) there: ``nn.MultiheadAttention`` transposes batch-first input).

    The keys are the ones torch attends over: ``static_k`` when given, then the ``bias_k`` row
    (``add_bias_kv=True``) and the zero row (``add_zero_attn=True``) appended, the masks padded
    for them with "attend" as torch pads them. The causal hint is followed where torch follows it:
    without a key padding mask and ``need_weights=False`` it drops ``attn_mask`` and runs SDPA's
    ``is_causal`` over all keys, the appended ones included (which no query then sees); otherwise
    ``attn_mask`` is the mask."""
    a = _bind(_MHA_PARAMS, args, kwargs)
    query, key = a["query"].detach(), a["key"].detach()
    batched = query.dim() == 3
    if not batched:
        query, key = query.unsqueeze(1), key.unsqueeze(1)
    heads = int(a["num_heads"])
    embed = query.shape[-1]
    n, d = query.shape[1], embed // heads
    rows = _rows(query.shape[0], query.device)
    bias = a.get("in_proj_bias")
    if a.get("use_separate_proj_weight"):
        wq, wk = a["q_proj_weight"], a["k_proj_weight"]
    else:
        wq, wk = a["in_proj_weight"][:embed], a["in_proj_weight"][embed : 2 * embed]
    bq, bk = (None, None) if bias is None else (bias[:embed].detach(), bias[embed : 2 * embed].detach())
    q = F.linear(query.index_select(0, rows), wq.detach(), bq)
    q = q.reshape(q.shape[0], n, heads, d).permute(1, 2, 0, 3)  # (N, H, r, d)
    static_k, bias_k = a.get("static_k"), a.get("bias_k")
    if static_k is not None:  # (N*H, S, d), in place of the projected key
        k = static_k.detach().reshape(n, heads, -1, d)
    else:
        k = F.linear(key, wk.detach(), bk)
        k = k.reshape(k.shape[0], n, heads, d).permute(1, 2, 0, 3)
    extra = []  # the keys torch appends, each one attended without a mask
    if bias_k is not None:
        extra.append(bias_k.detach().reshape(1, heads, 1, d).expand(n, -1, -1, -1))
    if a.get("add_zero_attn"):
        extra.append(torch.zeros_like(k[:, :, :1]))
    k = torch.cat([k, *extra], dim=2) if extra else k
    attn_mask, padding = a.get("attn_mask"), a.get("key_padding_mask")
    if a.get("is_causal") and padding is None and not a.get("need_weights", True):
        return attention_stats(q, k, 1.0 / math.sqrt(d), _causal(rows, k.shape[-2]), None)
    allowed, add = None, None
    if attn_mask is not None:
        # F.pad's zeros are "attend" in both mask kinds: False (not masked) and +0.
        mask = F.pad(_rows_of(attn_mask.detach(), rows), (0, len(extra)))
        allowed, add = _split_mask(
            mask.reshape(n, heads, *mask.shape[-2:]) if mask.dim() == 3 else mask, masked_is_true=True
        )  # a 3-D mask is (N*H, L, S)
    if padding is not None:
        pad = F.pad(padding.detach().reshape(n, 1, 1, -1), (0, len(extra)))
        pad_ok, pad_add = _split_mask(pad, masked_is_true=True)
        allowed = _and(allowed, pad_ok)
        add = pad_add if add is None else (add if pad_add is None else add + pad_add)
    return attention_stats(q, k, 1.0 / math.sqrt(d), allowed, add)


_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax)


def softmax_scores(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The input of a softmax over the last dimension of a floating tensor of 3 or more
    dimensions (``F.softmax``, ``torch.softmax``, ``Tensor.softmax``): eager attention's scores."""
    x = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 3 or not isinstance(dim, int):
        return None
    return x if dim in (-1, x.dim() - 1) else None


_ATTENTION_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_GATE_CLASS = re.compile(r"channel|spatial|squeeze", re.IGNORECASE)  # CBAM/SE "attention": a gate
_QK_NAMES = frozenset(
    {
        "q_proj",
        "k_proj",
        "qkv_proj",
        "query",
        "key",
        "qkv",
        "Wqkv",
        "c_attn",
        "in_proj_weight",
        "query_key_value",
        "to_q",
        "to_k",
        "to_qkv",
        "q_lin",
        "k_lin",
        "wq",
        "wk",
    }
)


def looks_like_attention(module: nn.Module) -> bool:
    """Whether ``module`` says it computes attention: its class name (``LlamaAttention``,
    ``MultiheadAttention``, ``SelfAttn``; not CBAM's channel or spatial gates), or its own query
    and key projections (``q_proj``/``k_proj``, ``qkv``, ``c_attn``, ``in_proj_weight``)."""
    name = type(module).__name__
    if _ATTENTION_CLASS.search(name) and not _GATE_CLASS.search(name):
        return True
    own = {n for n, _ in module.named_children()} | {n for n, _ in module.named_parameters(recurse=False)}
    return not own.isdisjoint(_QK_NAMES)


class _AttentionMode(TorchFunctionMode):
    """Runs every function unchanged; measures the attention calls after they return."""

    def __init__(self, probe: AttentionProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            self.probe.measure(sdpa_stats, args, kwargs)
        elif func is F.multi_head_attention_forward:
            self.probe.measure(mha_stats, args, kwargs)
        elif func in _SOFTMAX:
            self.probe.measure_softmax(args, kwargs)
        return out


class _ModeScope:
    """When the attention mode is on: over a whole forward (``enter``: a root that is the
    attention, the compiled fallback's rerun), or while modules that look like attention run
    (``enter_attention``/``leave_attention`` from their hooks, nested)."""

    def __init__(self, probe: AttentionProbe) -> None:
        self.probe = probe
        self.mode: _AttentionMode | None = None
        self._depth = 0  # attention-like modules running, nested
        self._scoped = False  # the mode was entered by an attention-like module's hook

    def enter(self, scoped: bool = False) -> None:
        if self.mode is None:
            self.mode = _AttentionMode(self.probe)
            self.mode.__enter__()
            self._scoped = scoped

    def enter_attention(self) -> None:
        self._depth += 1
        self.enter(scoped=True)

    def leave_attention(self) -> None:
        if self._depth > 0:
            self._depth -= 1
            if self._depth == 0 and self._scoped:
                self.exit()

    def exit(self) -> None:
        mode, self.mode = self.mode, None
        self._depth, self._scoped = 0, False
        if mode is not None:
            mode.__exit__(None, None, None)


class AttentionProbe(Probe):
    """Per attention module: the mean over heads of the max logit and of the softmax entropy
    (scalars ``attention/max_logit/{module}``, ``attention/entropy/{module}``), the per-head values
    (histograms ``attention/max_logit_heads/{module}``, ``attention/entropy_heads/{module}``, one
    value per head), and the findings ``attention_logit_growth`` and ``attention_entropy_collapse``.

    Seen: ``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward``, and eager
    attention (a softmax over the last dimension of a tensor of 3 or more dimensions, inside a
    module that :func:`looks_like_attention`). A module that looks like attention, ran on a
    logging step and made none of these calls is named once (a warning and the finding
    ``attention_not_seen``). Under ``torch.compile`` (no function mode or hook may enter the
    graph) the logging step's forward runs once more, eagerly and without gradients, from the
    inputs and RNG state of the real one, and the attention is read there."""

    name = "attention"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self._scope = _ModeScope(self)
        self._stack: list[str] = []
        top = root_name(ctx.root)
        self._names = {id(m): (n or top) for n, m in ctx.root.named_modules()}
        self._modules = [m for _, m in ctx.root.named_modules()]
        self._attention_like = {self._names[id(m)] for m in self._modules if looks_like_attention(m)}
        self._seen: dict[str, tuple[str, str]] = {}  # module -> its two tags
        self.not_measurable = 0  # module-steps whose attention was read over non-finite logits
        self._ran: set[str] = set()  # modules that look like attention and ran in this step
        self._unseen_said = False
        self._baselines = Baselines.of(ctx.config.thresholds)  # each module against its own past
        self._devices = cuda_devices(ctx.root)
        # Compiled: the eager rerun costs a forward, worth it where something looks like attention.
        self._rerun_possible = bool(self._attention_like) and replay_possible(ctx)
        self._records: list[ForwardRecord] = []  # compiled: the forwards to run again eagerly

    def active(self, plan: StepPlan) -> bool:
        # Nothing that looks like attention (an MLP, a CNN): no function mode and no stack hooks.
        # They cost a Python call per torch function and two hooks per module on every logging
        # step (on an 801-module MLP, ~40% of the logging step) to find attention that is not
        # there; an ``F.scaled_dot_product_attention`` called from a module that neither is named
        # like attention nor owns query/key projections is not read.
        return plan.logging and bool(self._attention_like)

    def on_step_start(self, plan: StepPlan) -> None:
        """Which module makes each call: the innermost one whose forward is running (hooked on
        every module for this step only; the hooks go when the step ends). Compiled: only around
        the eager rerun, so that no compiled code can take them in."""
        self._records = []
        if not self.ctx.compiled:
            self._hook_modules(self.ctx.step_hooks.hook)

    def _hook_modules(self, keep: Any) -> None:
        """Which module runs (a stack), and the function mode on while a module that looks like
        attention runs, off elsewhere: every torch call under the mode costs a Python call, and
        most of a transformer's calls (its MLPs, norms, embeddings, the loss, and the watch's own
        statistics in the other modules' hooks) are outside attention (llama8: ~5 ms of a
        logging step's forward)."""
        ran, like = self._ran, self._attention_like
        root = self.ctx.root
        for module in self._modules:
            name = self._names[id(module)]
            # (The root's mode is on_forward's: a call of the root runs the pre-hooks it had when
            # called, so the one hooked for a logging step also runs on the step after it.)
            attention = name in like and module is not root

            def push(m: nn.Module, a: Any, n: str = name, attention: bool = attention) -> None:
                self._stack.append(n)
                if n in like:
                    ran.add(n)
                if attention:
                    self._scope.enter_attention()

            def pop(m: nn.Module, a: Any, o: Any, attention: bool = attention) -> None:
                if self._stack:
                    self._stack.pop()
                if attention:
                    self._scope.leave_attention()

            keep(module.register_forward_pre_hook(push))
            keep(module.register_forward_hook(pop, always_call=True))

    def on_forward(self, args: tuple, kwargs: dict) -> None:
        if self.ctx.compiled:
            if self._rerun_possible:
                self._records.append(capture_forward(args, kwargs, self._devices))
        elif self._names[id(self.ctx.root)] in self._attention_like:
            # The root is the attention (its hooks, added in this forward's pre-hooks, miss this
            # call): the mode for the whole forward.
            self._scope.enter()

    def on_forward_end(self, output: Any) -> None:
        self._scope.exit()
        if self._records:
            self._rerun()

    def _rerun(self) -> None:
        """The compiled fallback: this step's forwards again, eagerly, without gradients, with the
        hooks and the mode on for them alone (buffers, RNG and modes put back afterwards)."""
        records, self._records = self._records, []
        if "<attention>" in self.ctx.disabled:
            return
        changed = [name or "input" for r in records for name in r.changed_inputs()]
        if changed:
            # The forward changed its own inputs in place: running it again would change the
            # caller's tensors a second time (and, in eager code, what the backward saved).
            self.ctx.disable(
                "<attention>",
                None,
                RuntimeError(
                    f"the forward changes its inputs in place ({', '.join(changed[:3])}): under torch.compile "
                    "attention is read from an eager rerun of the forward, which would change them again"
                ),
            )
            return
        handles: list[Any] = []
        try:
            self._hook_modules(handles.append)
            with preserved_state(self.ctx.root), self.ctx.unobserved(), eager_stance(True):
                self._scope.enter()
                try:
                    for record in records:
                        run_forward(self.ctx.root, record)
                finally:
                    self._scope.exit()
        except Exception as e:  # the step itself ran already: training goes on
            self.ctx.disable("<attention>", None, e)
        finally:
            for handle in handles:
                handle.remove()
            self._stack.clear()

    def measure_softmax(self, args: tuple, kwargs: dict) -> None:
        """A softmax in a module that looks like attention, over the last dimension of its scores."""
        where = next((n for n in reversed(self._stack) if n in self._attention_like), None)
        if where is None:
            return  # a router's, a classifier's, a loss's softmax: no attention
        scores = softmax_scores(args, kwargs)
        if scores is not None:
            self.measure(lambda a, k: score_stats(scores), args, kwargs, where)

    def measure(self, stats: Any, args: tuple, kwargs: dict, where: str | None = None) -> None:
        buffer = self.ctx.buffer
        if buffer is None or "<attention>" in self.ctx.disabled:
            return
        if where is None:
            where = self._stack[-1] if self._stack else self._names[id(self.ctx.root)]
        try:
            with torch.no_grad():
                max_logit, entropy, normalised = stats(args, kwargs)
                # Heads over non-finite logits are not measurable (NaN from logit_stats): the
                # scalars are the mean of the measurable heads (NaN, so not written, when none
                # is), and the count of the others is written only when it is not 0.
                measurable = torch.isfinite(max_logit) & torch.isfinite(entropy)
                heads = measurable.sum()
                unmeasurable = (~measurable).sum().float()
                buffer.add_scalar(
                    attention_tag("max_logit", where), torch.where(measurable, max_logit, 0).sum() / heads
                )
                buffer.add_scalar(attention_tag("entropy", where), torch.where(measurable, entropy, 0).sum() / heads)
                buffer.add_scalar(
                    attention_tag("not_measurable", where), torch.where(unmeasurable > 0, unmeasurable, math.nan)
                )
                buffer.add_measure(f"attention_not_measurable/{where}", unmeasurable)
            # The per-head values as histograms (one value per head; DISTRIBUTIONS shows the
            # spread, so one collapsing head stands out of a healthy mean). set_, not add_: like
            # the scalar beside it, the last call of the step wins (a module called twice in a
            # step, e.g. two micro-batches, would otherwise hold 2 x heads values).
            buffer.set_histogram(attention_tag("max_logit_heads", where), max_logit)
            buffer.set_histogram(attention_tag("entropy_heads", where), entropy)
            buffer.add_measure(f"attention_max_logit/{where}", max_logit.amax())
            buffer.add_measure(f"attention_entropy_norm/{where}", normalised.nanmean())
            self._seen[where] = (attention_tag("entropy", where), f"attention_max_logit/{where}")
        except Exception as e:  # the attention itself ran already: training goes on
            self.ctx.disable("<attention>", None, e)

    def on_step_end(self, host: HostStep | None) -> None:
        self._scope.exit()
        self._stack.clear()
        self._records = []
        ran, self._ran = self._ran, set()
        if host is None:
            return
        self._say_unseen(ran, host.step)
        limits = self.ctx.config.thresholds
        types = self.ctx.module_types
        for where, (entropy_tag, max_key) in self._seen.items():
            if host.measures.get(f"attention_not_measurable/{where}", 0.0) != 0.0:
                self.not_measurable += 1  # over non-finite logits: no verdict (counted, and tagged)
                continue
            entropy, max_logit = host.scalars.get(entropy_tag), host.measures.get(max_key)
            normalised = host.measures.get(f"attention_entropy_norm/{where}")
            kind = type(self._module(where)).__name__
            fell, rose = self._against_own_past(where, normalised, max_logit)
            if max_logit is not None and max_logit > limits.attention_max_logit:
                self.ctx.findings.add(
                    Alert(
                        "attention_logit_growth",
                        where,
                        host.step,
                        f"attention logits reach {max_logit:.3g} (> {limits.attention_max_logit:g}): attention turns "
                        "one-hot; qk-layernorm or a lower learning rate is the usual fix",
                        {"max_logit": max_logit},
                        module_type=types.get(where, kind),
                    )
                )
            elif rose is not None:
                self.ctx.findings.add(
                    Alert(
                        "attention_logit_growth",
                        where,
                        host.step,
                        f"attention logits reach {rose.value:.3g}, {rose.factor:.3g}x this module's median "
                        f"{rose.median:.3g} over its last {rose.history} logging steps ({rose.deviations:.0f} "
                        "deviations): attention turns one-hot; qk-layernorm or a lower learning rate is the usual fix",
                        rose.numbers("max_logit"),
                        module_type=types.get(where, kind),
                    )
                )
            if fell is not None and not (entropy is not None and entropy < limits.attention_entropy_floor):
                self.ctx.findings.add(
                    Alert(
                        "attention_entropy_collapse",
                        where,
                        host.step,
                        f"attention entropy fell to {fell.value:.3g} of its maximum (log of the keys attended), "
                        f"{fell.factor:.3g}x below this module's median {fell.median:.3g} over its last "
                        f"{fell.history} logging steps: attention turns one-hot; the loss tends to oscillate or "
                        "diverge next",
                        fell.numbers("normalised_entropy") | ({"entropy": entropy} if entropy is not None else {}),
                        module_type=types.get(where, kind),
                    )
                )
            if entropy is not None and math.isfinite(entropy) and entropy < limits.attention_entropy_floor:
                self.ctx.findings.add(
                    Alert(
                        "attention_entropy_collapse",
                        where,
                        host.step,
                        f"attention entropy fell to {entropy:.3g} nats (< {limits.attention_entropy_floor:g}): each query "
                        "attends to one key; the loss tends to oscillate or diverge next",
                        {"entropy": entropy},
                        module_type=types.get(where, kind),
                    )
                )
        self._seen = {}

    def _against_own_past(
        self, where: str, normalised: float | None, max_logit: float | None
    ) -> tuple[Shift | None, Shift | None]:
        """(normalised entropy fell, max logit rose) against this module's own recent logging
        steps (a non-finite value is not measured: no verdict, and the baseline does not learn it)."""
        limits = self.ctx.config.thresholds
        fell = self._baselines.judge("entropy", where, normalised, "down") if normalised is not None else None
        rose = self._baselines.judge("max_logit", where, max_logit, "up") if max_logit is not None else None
        if rose is not None and rose.value <= limits.attention_logit_jump_floor:
            rose = None
        return fell, rose

    def _say_unseen(self, ran: set[str], step: int) -> None:
        """Once per run: modules that look like attention ran on this logging step, and no call
        in them, above them or below them was one this probe reads."""
        if self._unseen_said or "<attention>" in self.ctx.disabled:
            return
        top = self._names[id(self.ctx.root)]
        seen = list(self._seen)
        unseen = sorted(
            n for n in ran if not any(w in (n, top) or w.startswith(n + ".") or n.startswith(w + ".") for w in seen)
        )
        if not unseen:
            return
        self._unseen_said = True
        more = f" and {len(unseen) - 1} more" if len(unseen) > 1 else ""
        alert = Alert(
            "attention_not_seen",
            unseen[0],
            step,
            f"{unseen[0]}{more} look like attention but made no attention call this probe reads "
            "(F.scaled_dot_product_attention, nn.MultiheadAttention, or a softmax over the last dimension of "
            "3-D or larger scores; flex_attention and custom kernels are not seen): no attention/ statistics "
            "or findings for them",
            {"modules": float(len(unseen))},
            module_type=self.ctx.module_types.get(unseen[0], type(self._module(unseen[0])).__name__),
        )
        self.ctx.findings.add(alert)
        warn(f"introspect: step {step}: {alert.message}", IntrospectWarning)

    def _module(self, where: str) -> nn.Module | None:
        for module in self._modules:
            if self._names[id(module)] == where:
                return module
        return None

    def on_close(self, failed: bool) -> None:
        self._scope.exit()


def repeated_blocks(root: nn.Module) -> dict[str, nn.Module]:
    """The residual blocks: the elements of each ``nn.ModuleList`` of two or more modules of one
    type that hold parameters (``transformer.h.0``, ``layers.1``, ``model.layers.3``), and in an
    ``nn.Sequential`` the children of a type that repeats, holds parameters and is itself made of
    modules (a block, not a layer: torchvision's ``layer2.0``, a ``BasicBlock``; a ViT's
    ``encoder.layers.encoder_layer_0``). A Sequential of plain layers (Conv, ReLU, ...) has none."""
    blocks: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            children = list(module)
            if len({type(c) for c in children}) == 1 and any(True for _ in children[0].parameters()):
                for i, child in enumerate(children):
                    blocks[f"{name}.{i}" if name else str(i)] = child
        elif isinstance(module, nn.Sequential) and len(module) >= 2:
            named = list(module.named_children())
            counts: dict[type, int] = {}
            for _, child in named:
                counts[type(child)] = counts.get(type(child), 0) + 1
            for key, child in named:
                if (
                    counts[type(child)] >= 2
                    and not isinstance(child, (nn.Sequential, nn.ModuleList))
                    and any(True for _ in child.children())
                    and any(True for _ in child.parameters())
                ):
                    blocks[f"{name}.{key}" if name else key] = child
    return blocks


def _first_float(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)) and output:
        return _first_float(output[0])
    return None


class MassiveActivations(Probe):
    """Per block output (the residual stream): max |x| against median |x| (Sun et al. 2024)."""

    name = "massive_activations"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self._blocks = repeated_blocks(ctx.root)
        self._in_forward = False

    def active(self, plan: StepPlan) -> bool:
        return plan.logging and bool(self._blocks) and not self.ctx.compiled

    def on_step_start(self, plan: StepPlan) -> None:
        for name, block in self._blocks.items():
            self.ctx.step_hooks.hook(block.register_forward_hook(lambda m, a, o, n=name: self._measure(n, o)))

    def on_forward(self, args: tuple, kwargs: dict) -> None:
        self._in_forward = True

    def on_forward_end(self, output: Any) -> None:
        self._in_forward = False

    def _measure(self, name: str, output: Any) -> None:
        buffer = self.ctx.buffer
        x = _first_float(output)
        if not self._in_forward or buffer is None or x is None or x.numel() == 0 or "<massive>" in self.ctx.disabled:
            return
        try:
            with torch.no_grad():
                flat = x.detach().reshape(-1)
                stride = max(1, flat.numel() // MEDIAN_SAMPLE)
                buffer.add_measure(f"massive_max/{name}", flat.abs().amax().float())
                buffer.add_measure(f"massive_median/{name}", flat[::stride].abs().float().median())
        except Exception as e:
            self.ctx.disable("<massive>", None, e)

    def on_step_end(self, host: HostStep | None) -> None:
        self._in_forward = False
        if host is None:
            return
        limits = self.ctx.config.thresholds
        for name, block in self._blocks.items():
            top, median = host.measures.get(f"massive_max/{name}"), host.measures.get(f"massive_median/{name}")
            if top is None or median is None or not math.isfinite(top):
                continue
            if top > limits.massive_activation_abs and top > limits.massive_activation_ratio * median:
                ratio = top / median if median > 0 else math.inf
                self.ctx.findings.add(
                    Alert(
                        "massive_activation",
                        name,
                        host.step,
                        f"one residual-stream value reaches {top:.3g}, {ratio:.3g}x the median |x| {median:.3g}: "
                        "such values act as fixed biases and break low-precision training",
                        {"max_abs": top, "median_abs": median},
                        module_type=type(block).__name__,
                    )
                )


def output_logits(output: Any) -> torch.Tensor | None:
    """The model's output logits: ``ModelOutput.logits`` (Hugging Face), a ``"logits"`` entry, or
    a floating tensor of two or more dimensions whose last is the class axis."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, torch.Tensor):
        logits = output
    if (
        isinstance(logits, torch.Tensor)
        and logits.layout == torch.strided
        and logits.is_floating_point()
        and logits.dim() >= 2
        and logits.shape[-1] >= 2
    ):
        return logits
    return None


class LogitDivergence(Probe):
    """log Z = logsumexp of the output logits, its mean and std over positions (Wortsman et al.)."""

    name = "logit_divergence"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self._classes = 0
        self._where = root_name(ctx.root)

    def on_forward_end(self, output: Any) -> None:
        logits = output_logits(output)
        buffer = self.ctx.buffer
        if logits is None or buffer is None or "<logit_divergence>" in self.ctx.disabled:
            return
        try:
            with torch.no_grad():
                log_z = torch.logsumexp(logits.detach().float(), dim=-1).reshape(-1)
                buffer.add_measure("log_z/mean", log_z.mean())
                buffer.add_measure(
                    "log_z/std", log_z.std() if log_z.numel() > 1 else torch.zeros((), device=log_z.device)
                )
        except Exception as e:  # an output it cannot read: this probe stops, training goes on
            self.ctx.disable("<logit_divergence>", None, e)
            return
        self._classes = logits.shape[-1]

    def on_step_end(self, host: HostStep | None) -> None:
        if host is None or "log_z/mean" not in host.measures:
            return
        mean, std = host.measures["log_z/mean"], host.measures["log_z/std"]
        drift, limit = mean - math.log(self._classes), self.ctx.config.thresholds.logit_log_z_drift
        if math.isfinite(drift) and (abs(drift) > limit or std > limit):
            self.ctx.findings.add(
                Alert(
                    "logit_divergence",
                    self._where,
                    host.step,
                    f"log Z of the output logits is {mean:.3g} ± {std:.3g} (uniform logits: {math.log(self._classes):.3g}): "
                    "the logits diverge; a z-loss (PaLM) keeps log Z near 0",
                    {"log_z_mean": mean, "log_z_std": std},
                    module_type=type(self.ctx.root).__name__,
                )
            )
