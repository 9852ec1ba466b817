"""The torch backend: the core's primitives over torch autograd, gradients landing in ``.grad``.

Pass 1 runs under ``torch.no_grad``; the loss's gradient with respect to the representations comes
from one ``backward`` on detached leaf copies, scaled by the step's ``GradScaler``; pass 2 pulls
each chunk's slice back with ``torch.autograd.backward(rep, grad_tensors=slice)``. The core writes
what is the same in every framework around these (flattening, the branches, zeros, the checks).
Every tensor whose ``.grad`` a step may touch is remembered before the first write -- the object
and a copy of its values -- so that a failing step puts every one back in place: the same object
with the same values (code holding ``.grad``, or views of one flat buffer, sees no partial sum).
The parameters of module encoders and losses are remembered before anything runs, other tensors
when the graph reaches them; a reentrant checkpoint's parameters are outside the graph until its
backward recomputes the block, so the recomputation is watched too; a loss or an encoder that
calls ``backward()`` itself is refused before it writes. The graph of the first chunk pass 2 pulls
back may be kept from pass 1 (``encode_keeping_graph``), with the versions of the tensors it saved,
so that pass 2 re-encodes that chunk instead if a later forward modified one in place.
Distributed wrappers synchronise on the last chunk that uses them only -- DDP is bypassed for the
others (for all of them in a distributed step, whose adapter averages DDP's gradients itself),
FSDP2 has its gradient sync switched off for them -- so gradients are reduced once per module per
step. No control flow of the algorithm lives here.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeGuard

import torch

from gradcache import Backend, GradCacheError, _padding, _tree, call_with_convention
from gradcache._errors import add_location_note
from gradcache_torch import _rng
from gradcache_torch._distributed import fsdp_units


def _is_tensor(value: Any) -> TypeGuard[torch.Tensor]:
    return isinstance(value, torch.Tensor)


def _graph_leaves(roots: Sequence[torch.Tensor],
                 on_recompute: Callable[[Any], None] | None = None) -> Iterator[torch.Tensor]:
    """Leaf tensors whose ``.grad`` a backward from ``roots`` will write (AccumulateGrad nodes).

    A node with a ``run_function`` is a reentrant checkpoint (``torch.utils.checkpoint`` with
    ``use_reentrant=True``, DeepSpeed's and fairscale's alike): its backward recomputes the block
    with a graph of its own and runs a backward through it, so the block's parameters are not in
    this graph. Such nodes are handed to ``on_recompute``.
    """
    seen: set[int] = set()
    # next_functions holds None for an input that needs no gradient
    stack: list[torch.autograd.graph.Node | None] = [
        root.grad_fn for root in roots if root.grad_fn is not None]
    for root in roots:
        if root.grad_fn is None and root.requires_grad:
            yield root
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            yield variable
        if on_recompute is not None and callable(getattr(node, "run_function", None)):
            on_recompute(node)
        stack.extend(next_node for next_node, _ in node.next_functions)


class _WatchedRecompute:
    """A reentrant checkpoint's ``run_function``, wrapped so that the graph its recomputation
    builds is walked -- and the tensors it reaches remembered -- before the checkpoint's own
    backward writes their ``.grad``. The block's inputs (detached copies made by the checkpoint)
    are left out: they are temporaries, and remembering them would keep them alive."""

    def __init__(self, run_function: Callable, remember_graph: Callable):
        self.run_function = run_function
        self.remember_graph = remember_graph

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.run_function(*args, **kwargs)
        inputs = {id(value) for value in (*args, *kwargs.values()) if _is_tensor(value)}
        roots = [leaf for leaf in _tree.flatten(outputs, _is_tensor)[0] if leaf.requires_grad]
        self.remember_graph(roots, exclude=inputs)
        return outputs


class _RefuseBackward:
    """Active while the user's code runs inside a step -- an encoder's call, the loss: a
    ``backward()`` there would write ``.grad`` before the step remembers what to restore (and
    the step then differentiates the same graph again), so it is refused before it writes.

    What every backward reaches is replaced -- ``torch.autograd._engine_run_backward`` where
    this torch has it (since 2.3; torch's own ``torch.compiler`` replaces it the same way), so
    that ``Tensor.backward``, ``torch.autograd.backward`` and any name bound to them earlier are
    all seen, while ``torch.autograd.grad`` (which writes no ``.grad``) passes; else the two
    public functions. It is replaced only while some thread runs such code (counted under a lock,
    so that concurrent steps install and remove it once), and refuses only in the thread that
    runs it; every other call passes straight through. Unlike a ``TorchFunctionMode``, nothing is
    added to the user's own operations. A backward the user's code runs in a thread of its own is
    not seen.
    """

    _lock = threading.Lock()
    _users = 0
    _originals: list[tuple[Any, str, Any]] = []
    _inside = threading.local()

    def __init__(self, who: str):
        self.who = who   # "the loss", "the encoder": what the refusal names

    @classmethod
    def running(cls) -> str | None:
        """What user code of a step this thread is inside (``"the loss"``...), or ``None``."""
        stack = getattr(cls._inside, "stack", None)
        return stack[-1] if stack else None

    def __enter__(self) -> _RefuseBackward:
        cls = _RefuseBackward
        with cls._lock:
            if cls._users == 0:
                cls._originals = [(owner, name, getattr(owner, name))
                                  for owner, name, _ in _backward_entries()]
                for owner, name, refusing in _backward_entries():
                    setattr(owner, name, refusing(getattr(owner, name)))
            cls._users += 1
        if not hasattr(cls._inside, "stack"):
            cls._inside.stack = []
        cls._inside.stack.append(self.who)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        cls = _RefuseBackward
        cls._inside.stack.pop()
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                for owner, name, original in cls._originals:
                    setattr(owner, name, original)
                cls._originals = []


def _backward_entries() -> list[tuple[Any, str, Callable[[Callable], Callable]]]:
    """``(owner, attribute, wrapper)`` for what :class:`_RefuseBackward` replaces."""
    if callable(getattr(torch.autograd, "_engine_run_backward", None)):
        return [(torch.autograd, "_engine_run_backward", _refused_accumulation)]
    return [(torch.Tensor, "backward", _refused), (torch.autograd, "backward", _refused)]


def _refusal(who: str) -> GradCacheError:
    if who == "the encoder":
        return GradCacheError(
            "the encoder calls backward() itself: the step pulls the gradients back through it "
            "(pass 2), so a backward inside it would write .grad outside the rollback (and once "
            "per chunk and pass); compute an auxiliary loss in loss_fn instead")
    return GradCacheError(
        f"{who} calls backward() itself: the step differentiates the loss (as loss.backward() "
        f"would, with every gradient written once), so a backward inside it would write .grad "
        f"twice and outside the rollback; return the loss instead")


def _refused(original: Callable) -> Callable:
    @functools.wraps(original)
    def backward(*args: Any, **kwargs: Any) -> Any:
        who = _RefuseBackward.running()
        if who is not None:
            raise _refusal(who)
        return original(*args, **kwargs)
    return backward


def _refused_accumulation(original: Callable) -> Callable:
    @functools.wraps(original)
    def run_backward(*args: Any, **kwargs: Any) -> Any:
        # (outputs, grad_outputs, keep_graph, create_graph, inputs, allow_unreachable,
        # accumulate_grad): backward accumulates into .grad, torch.autograd.grad does not
        accumulates = kwargs.get("accumulate_grad", args[6] if len(args) > 6 else True)
        who = _RefuseBackward.running()
        if who is not None and accumulates:
            raise _refusal(who)
        return original(*args, **kwargs)
    return run_backward


def _unwrap_distributed(encoder: Any) -> Any:
    """The module inside a DistributedDataParallel wrapper (calling it directly skips DDP's hooks)."""
    parallel = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    if parallel is not None and isinstance(encoder, parallel):
        return encoder.module
    return encoder


def _distributed_initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _SavedVersions(torch.autograd.graph.saved_tensors_hooks):
    """Around the forward whose graph pass 1 keeps: records the version of every tensor the graph
    saves, so that pass 2 can tell whether a later forward modified one in place (an
    ``nn.Embedding`` with ``max_norm`` renormalises its weight, a buffer updated in place): torch
    would refuse that backward ("modified by an inplace operation"), while re-encoding the chunk,
    as without a kept graph, works. Under saved-tensor hooks torch checks nothing itself, so this
    check stands in for its own. Each tensor is saved as a detached alias (its storage and
    version counter, its ``requires_grad`` flag -- a reentrant checkpoint reads it -- but not its
    ``grad_fn``: the tensor itself would tie an output to its own node in a cycle the collector
    cannot see), held weakly here: the graph, not this record, keeps it alive."""

    def __init__(self) -> None:
        self.versions: list[tuple[Any, int]] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            alias = tensor.detach()
            if tensor.requires_grad:
                alias.requires_grad_()
            self.versions.append((weakref.ref(alias), tensor._version))
            return alias

        super().__init__(pack, _identity_unpack)

    @classmethod
    def unless_hooked(cls) -> _SavedVersions | None:
        """A recorder, or ``None`` where saved-tensor hooks are already active (the caller's
        offloading, ``save_on_cpu``: the graph is then not kept, so that they pack every tensor
        as before) or disabled."""
        # private queries (torch's AOTAutograd makes them too): a torch without the first keeps
        # no graph
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", lambda: True)
        if top is None or not enabled() or top(False) is not None:
            return None
        return cls()

    def intact(self) -> bool:
        """Whether no saved tensor the graph still holds was modified in place since it was saved."""
        for ref, version in self.versions:
            alias = ref()
            if alias is not None and alias._version != version:
                return False
        return True


def _identity_unpack(alias: torch.Tensor) -> torch.Tensor:
    return alias


def check_keep_first_graph(value: Any) -> None:
    """``keep_first_graph`` must be a bool: checked before anything runs."""
    if not isinstance(value, bool):
        raise GradCacheError(f"keep_first_graph must be True or False, got {value!r}")


def owning_module(encoder: Any) -> torch.nn.Module | None:
    """The module an encoder is (DDP unwrapped) or whose bound method it is, else ``None``."""
    encoder = _unwrap_distributed(encoder)
    if isinstance(encoder, torch.nn.Module):
        return encoder
    owner = getattr(encoder, "__self__", None)
    return _unwrap_distributed(owner) if isinstance(owner, torch.nn.Module) else None


def trained_parameters(encoders: Any, loss_fn: Any) -> list[torch.Tensor]:
    """The parameters that require grad of every encoder that is a module (or a module's method,
    DDP unwrapped) and of a loss that is one.

    A step remembers their ``.grad`` before anything runs (``TorchBackend(protect=...)``), so that
    code which touches them outside the step's own backward -- a forward that zeroes or adds to
    its gradients, in pass 1 or before pass 2's walk of the graph -- is rolled back too. Other
    tensors are remembered when the graph reaches them. Malformed ``encoders`` give none here
    (the core refuses them).
    """
    listed = list(encoders) if isinstance(encoders, (list, tuple)) else [encoders]
    found: dict[int, torch.Tensor] = {}
    for candidate in [*listed, loss_fn]:
        module = owning_module(candidate)
        if module is not None:
            for parameter in module.parameters():
                if parameter.requires_grad:
                    found.setdefault(id(parameter), parameter)
    return list(found.values())


def is_sentence_transformer(encoder: Any) -> bool:
    """A ``sentence_transformers.SentenceTransformer`` (DDP-wrapped or not), told by its class's
    ancestry so that sentence-transformers is never imported here."""
    module = _unwrap_distributed(encoder)
    return any(cls.__name__ == "SentenceTransformer"
               and cls.__module__.split(".")[0] == "sentence_transformers"
               for cls in type(module).__mro__)


def call_encoder(encoder: Any, chunk: Any) -> Any:
    """One chunk through an encoder: :func:`gradcache.call_with_convention`, except that a
    SentenceTransformer takes its features as ONE dict (``model(features)``), a fresh copy since
    it adds its outputs to that dict."""
    if isinstance(chunk, Mapping) and is_sentence_transformer(encoder):
        return encoder(dict(chunk))
    return call_with_convention(encoder, chunk, _is_tensor)


def trim_padding(chunk: Any, mask_key: str = "attention_mask") -> Any:
    """Drops the trailing sequence columns that no row of ``chunk`` attends to.

    Applies to Mapping inputs holding ``mask_key`` (a ``(rows, length)`` 0/1 mask, Hugging Face
    style): the per-token leaves (``input_ids``, the mask, ``token_type_ids``, ``position_ids``, ...:
    ``gradcache._padding.PER_TOKEN_KEYS``) are cut to the last column any row uses; another leaf
    with as many columns is refused, since it may not be per-token. With a model that masks padding (as transformers do), the outputs are those
    of the padded chunk; the compute of the padding is saved. ``cached_step(..., pad_trim=True)``
    does this to every chunk (the core's :mod:`gradcache._padding`, the same on every backend).
    """
    mask = chunk.get(mask_key) if isinstance(chunk, Mapping) else None
    if not _is_tensor(mask) or mask.dim() != 2:
        return chunk
    keep = _padding.used_columns(mask.detach().cpu().numpy())
    return _padding.trim_columns(TorchBackend(), chunk, mask.shape[1], keep,
                                 keys=_padding.PER_TOKEN_KEYS | {mask_key})


class TorchBackend(Backend):
    """Primitives over torch autograd. One instance serves one step.

    Args:
        scaler: a ``torch.amp.GradScaler``; gradients are then scaled exactly as
            ``scaler.scale(loss).backward()`` scales them.
        protect: tensors whose ``.grad`` a failing step restores even if the step never reached them.
        bypass_ddp: call DDP-wrapped encoders' inner module in every chunk (a distributed step
            averages their gradients itself).
        defer_loss_grads: keep the gradients of the loss's own parameters in the accumulator (a
            dict ``{id(tensor): grad}``) instead of writing ``.grad`` at the loss, so that
            :func:`gradcache.cached_backward` scales them by its upstream gradient;
            :meth:`add_deferred` writes them (``cached_loss``).
    """

    name = "torch"

    def __init__(self, *, scaler: Any = None, protect: Sequence[torch.Tensor] = (),
                 bypass_ddp: bool = False, defer_loss_grads: bool = False,
                 keep_first_graph: bool = True):
        self.scaler = scaler
        # cached_loss: loss-owned gradients go to the accumulator ({id: grad}), not to .grad
        self.defer_loss_grads = defer_loss_grads
        self._owned: dict[int, torch.Tensor] = {}
        # id -> (tensor, None if its .grad was None, else (that .grad object, a copy of its values))
        self._saved: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self._copies: dict[int, torch.Tensor] = {}   # id(.grad object) -> its values, copied once
        self._initial = list(protect)
        self._unsynced: dict[int, Any] = {}   # FSDP2 modules whose gradient sync this step turned off
        self._units: dict[int, list] = {}      # encoder -> its FSDP2 units
        self.bypass_ddp = bypass_ddp            # a distributed step averages DDP's gradients itself
        self.keep_first_graph = keep_first_graph

    # -- tensors ------------------------------------------------------------------------------------
    def is_leaf(self, value: Any) -> bool:
        return _is_tensor(value)

    def concat_rows(self, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(leaves), dim=0)

    # -- randomness ---------------------------------------------------------------------------------
    def rng_capture(self, group: int, chunk: Any) -> _rng.RngState:
        return _rng.RngState.capture()

    def rng_replay(self, record: _rng.RngState) -> contextlib.AbstractContextManager:
        return _rng.replay(record)

    # -- autodiff -----------------------------------------------------------------------------------
    def encode(self, encoder: Any, chunk: Any, record: Any, get_rep: Callable) -> Any:
        with torch.no_grad():
            with _RefuseBackward("the encoder"):
                output = call_encoder(_unwrap_distributed(encoder), chunk)
            return get_rep(output)

    def encode_keeping_graph(self, encoder: Any, chunk: Any, record: Any,
                             get_rep: Callable) -> tuple[Any, Callable[[], bool]] | None:
        # Declined wherever a forward may take part in gradient synchronisation (DDP's forward
        # prepares its reducer for the backward that follows, FSDP2 units choose per chunk whether
        # to reduce-scatter; a plain function may call either): with a process group initialised
        # pass 2 re-encodes every chunk as before, each forward right before its own backward.
        # Declined too under the caller's saved-tensor hooks (their packing stays as it was).
        if not self.keep_first_graph or _distributed_initialised():
            return None
        saved = _SavedVersions.unless_hooked()
        if saved is None:
            return None
        with torch.enable_grad(), saved:
            with _RefuseBackward("the encoder"):
                output = call_encoder(encoder, chunk)
            rep = get_rep(output)
        # a tensor the kept graph saved, modified in place since (by a later chunk's forward):
        # torch would refuse that backward, so pass 2 re-encodes the chunk instead
        return rep, saved.intact

    def trains(self, encoder: Any) -> bool:
        # a module whose parameters all have requires_grad=False is a frozen tower (LiT's image
        # tower): encoded once, skipped in pass 2. A module without parameters, or any other
        # callable, may use trainable tensors it does not own: assume it trains.
        module = owning_module(encoder)
        if module is None:
            return True
        flags = [p.requires_grad for p in module.parameters()]
        return not flags or any(flags)

    def zeros_like(self, leaf: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(leaf)

    def detach(self, leaf: torch.Tensor) -> torch.Tensor:
        return leaf.detach()

    def scale_loss(self, value: torch.Tensor) -> torch.Tensor:
        # exactly as scaler.scale(loss).backward() scales every gradient of the step
        return self.scaler.scale(value) if self.scaler is not None else value

    def value_and_grad(self, fn: Callable, values: list, grads: Any) -> tuple[Any, list, Any]:
        leaves = [value.detach().requires_grad_() for value in values]
        mine = {id(leaf) for leaf in leaves}
        with torch.enable_grad():
            with _RefuseBackward("the loss"):
                target, value = fn(leaves)
            if not target.requires_grad:
                # as loss.backward() would: a loss without a graph gives no gradient, and zeros
                # written in its place would look like a trained step
                raise GradCacheError(
                    "the loss does not depend on the representations (it returned a tensor "
                    "without a graph: does it detach them, or run under torch.no_grad()?)")
            # (cached_loss differentiates with torch.autograd.grad: no reentrant checkpoint)
            watch = None if self.defer_loss_grads else self._watch_recompute
            reached = list(_graph_leaves([target], watch))
            if leaves and not any(id(tensor) in mine for tensor in reached):
                # a graph through the loss's own parameters only (or a fresh leaf): loss.backward()
                # would leave the encoders' .grad as it was, pass 2 would write zeros there
                raise GradCacheError(
                    "the loss does not depend on the representations (no gradient reaches them "
                    "from the tensor it returned: does it read them through .data or .detach(), "
                    "or only its own parameters?)")
            owned = [tensor for tensor in reached if id(tensor) not in mine]
            if not self.defer_loss_grads:
                # the loss's own parameters get their .grad here: remember them for a rollback
                self._remember(owned)
                torch.autograd.backward(target)
                return value, [leaf.grad for leaf in leaves], grads
            # cached_loss: the loss-owned gradients wait in the accumulator for the backward,
            # which scales them by the incoming gradient; no .grad is written now
            found = torch.autograd.grad(target, leaves + owned, allow_unused=True)
        grads = dict(grads or {})
        for tensor, grad in zip(owned, found[len(leaves):]):
            if grad is not None:
                self._owned[id(tensor)] = tensor
                grads[id(tensor)] = grad + grads[id(tensor)] if id(tensor) in grads else grad
        return value, list(found[:len(leaves)]), grads

    def add_deferred(self, grads: Any) -> None:
        """Adds the (upstream-scaled) loss-owned gradients that :func:`gradcache.cached_backward`
        returned into ``.grad``, as ``backward`` accumulates them; call it inside the transaction."""
        for key, grad in (grads or {}).items():
            tensor = self._owned[key]
            self._remember([tensor])
            if tensor.grad is None:
                tensor.grad = grad.detach()
            else:
                tensor.grad.add_(grad.to(tensor.grad.dtype))

    def owned_parameters(self) -> list[torch.Tensor]:
        """The tensors outside the encoders whose gradient the loss produced (a temperature)."""
        return list(self._owned.values())

    def vjp(self, encoder: Any, chunk: Any, record: Any, outputs: Callable, grads: Any, *,
            final_use: bool) -> tuple[list, Any]:
        module = encoder if final_use and not self.bypass_ddp else _unwrap_distributed(encoder)
        if id(encoder) not in self._units:
            self._units[id(encoder)] = fsdp_units(encoder)
        for unit in self._units[id(encoder)]:
            # FSDP2 cannot be bypassed (its parameters are sharded): accumulate unsharded gradients
            # locally and reduce-scatter once, in the backward of the last chunk
            unit.set_requires_gradient_sync(final_use, recurse=False)
            self._unsynced[id(unit)] = unit
        with torch.enable_grad():
            with _RefuseBackward("the encoder"):
                output = call_encoder(module, chunk)
            leaves, cotangents = outputs(output)
            pairs = [(r, g) for r, g in zip(leaves, cotangents) if g is not None and r.requires_grad]
            if not pairs:
                raise GradCacheError(
                    "the representation does not depend on any tensor that requires grad (is the "
                    "encoder frozen, or does get_rep detach?)")
            roots = [r for r, _ in pairs]
            self._remember_graph(roots)
            module = owning_module(encoder)
            if module is not None:
                # a safety net for what a backward may write outside the graph the walk sees
                # (DDP's all-reduce writes the whole bucket): the module's parameters are few
                # more than the graph's, and remembering one costs nothing while .grad is None
                self._remember(p for p in module.parameters() if p.requires_grad)
            torch.autograd.backward(roots, [g.to(r.dtype) for r, g in pairs])
        return leaves, grads

    # -- nothing half-done --------------------------------------------------------------------------
    def _remember(self, tensors: Any) -> None:
        for tensor in tensors:
            if id(tensor) not in self._saved:
                grad = tensor.grad
                if grad is None:
                    self._saved[id(tensor)] = (tensor, None)
                    continue
                # one .grad object held by two tensors is copied once, when the first is
                # remembered: the second may be remembered after a write through the first
                values = self._copies.get(id(grad))
                if values is None:
                    values = self._copies[id(grad)] = grad.detach().clone()
                self._saved[id(tensor)] = (tensor, (grad, values))

    def _remember_graph(self, roots: Sequence[torch.Tensor], exclude: Any = ()) -> None:
        """Remembers every tensor a backward from ``roots`` writes, those inside reentrant
        checkpoints included (each checkpoint's recomputation is watched: :class:`_WatchedRecompute`)."""
        self._remember(tensor for tensor in _graph_leaves(roots, self._watch_recompute)
                       if id(tensor) not in exclude)

    def _watch_recompute(self, node: Any) -> None:
        if not isinstance(node.run_function, _WatchedRecompute):
            node.run_function = _WatchedRecompute(node.run_function, self._remember_graph)

    def _restore(self) -> list[str]:
        """Every remembered ``.grad`` back as it was: the same object, its values copied back in
        place (a view of a flat buffer writes through to it); ``None`` again where it was.
        A tensor that cannot be put back does not stop the others: what went wrong is returned,
        for a note on the error that is propagating."""
        problems = []
        with torch.no_grad():
            for tensor, held in self._saved.values():
                try:
                    if held is None:
                        tensor.grad = None
                        continue
                    grad, values = held
                    try:
                        grad.copy_(values)
                    except RuntimeError:
                        # not writable in place (an expanded tensor): nothing wrote into it then
                        # either, as backward accumulates in place
                        pass
                    if tensor.grad is not grad:
                        tensor.grad = grad
                except Exception as error:
                    problems.append(f"gradcache: could not restore the .grad of a tensor of "
                                    f"shape {tuple(tensor.shape)} ({type(error).__name__}: "
                                    f"{error})")
        return problems

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self._saved.clear()
        self._copies.clear()
        self._remember(self._initial)
        try:
            yield
        except BaseException as error:
            for problem in self._restore():
                add_location_note(error, problem)
            raise
        finally:
            self._saved.clear()
            self._copies.clear()
            for unit in self._unsynced.values():   # FSDP2's default, for the caller's own steps
                unit.set_requires_gradient_sync(True, recurse=False)
            self._unsynced.clear()
            self._units.clear()

    # -- host values ---------------------------------------------------------------------------------
    def to_host(self, leaf: torch.Tensor) -> Any:
        if leaf.dtype in (torch.bfloat16, torch.float16):   # numpy has no bfloat16
            leaf = leaf.float()
        return leaf.detach().cpu().numpy()
