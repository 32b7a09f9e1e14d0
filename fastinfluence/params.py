"""Which parameters θ_S the influence is taken over, and flat views of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fastinfluence.labelled_data import Inputs, model_arguments, tensors_in
from fastinfluence.modes import eval_mode

ParamsSpec = str | Sequence[str] | Sequence[nn.Parameter]


@dataclass(frozen=True)
class ParameterSelection:
    """The selected parameters, in the model's ``named_parameters`` order.

    ``names`` index ``model.named_parameters()``; the flat vector of the selection is the
    concatenation of the flattened tensors in this order (docs/design.md §2, ``Influence.ihvp``).
    A tensor tied to several modules is one entry, under the first name ``named_parameters()``
    gives it (``functional_call`` then reaches every use of it).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    head: nn.Linear | None
    """The ``nn.Linear`` whose weight (and bias, if it has one) are exactly the selection
    (whether the closed form applies to it, tied weights included, is decided by
    :func:`fastinfluence.hessian.probe.probe_model`)."""
    shared: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Each selected tensor the model lists under several names (tied weights): its name in
    ``names`` → its other names."""

    @property
    def numel(self) -> int:
        """``p``, the number of selected parameter entries."""
        return sum(s.numel() for s in self.shapes)

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tensors shaped like the selected parameters, in their order, as one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat ``[p]`` vector into named tensors shaped like the parameters."""
        sizes = [s.numel() for s in self.shapes]
        pieces = torch.split(flat, sizes, dim=-1)
        lead = flat.shape[:-1]
        return {
            name: piece.reshape(*lead, *shape)
            for name, piece, shape in zip(self.names, pieces, self.shapes, strict=True)
        }


def select_parameters(
    model: nn.Module, params: ParamsSpec, example: Inputs | None = None
) -> ParameterSelection:
    """Resolve ``params`` against ``model``.

    Args:
        model: the module whose parameters are selected.
        params: one of

            * ``"last"``: the trainable parameters of the module that holds the parameter
              the forward on ``example`` uses last (the innermost running module holding
              it), a weight it shares with another module (tied) included. Without
              ``example`` the last module with parameters in registration order is taken,
              which differs when, say, an output layer is registered before the body. A last
              module whose parameters are all frozen (``requires_grad=False``) is an error,
              not skipped: the layer before it is not what "last" means; name the parameters
              (or ``"all"``) instead.
            * ``"all"``: every parameter that requires grad.
            * module or parameter names (``"fc"``, ``"fc.weight"``): all their parameters,
              frozen or not; a tied parameter or shared module is found under any of its
              names.
            * parameters of the model.
        example: a batch the model accepts (on its device), run once in eval mode without
            gradients to find the parameter used last; used only by ``"last"``.
    """
    named = dict(model.named_parameters())
    canonical, tied = _parameter_names(model)
    if not named:
        raise ValueError("the model has no parameters: there is nothing to take influence over")
    if isinstance(params, str):
        if params == "last":
            names = _names_of_last_module(model, named, canonical, example)
        elif params == "all":
            names = [n for n, p in named.items() if p.requires_grad]
            if not names:
                raise ValueError('params="all": no parameter of the model requires grad')
        else:
            raise ValueError(
                f'params must be "last", "all", a list of module names or a list of '
                f"parameters, got {params!r}"
            )
    else:
        items = list(params)
        if not items:
            raise ValueError("params is an empty list: select at least one parameter")
        if all(isinstance(item, str) for item in items):
            names = _names_of_modules(model, named, canonical, items)
        elif all(isinstance(item, torch.Tensor) for item in items):
            by_id = {id(p): n for n, p in named.items()}
            missing = [i for i, item in enumerate(items) if id(item) not in by_id]
            if missing:
                raise ValueError(f"params[{missing[0]}] is not a parameter of the model")
            wanted = {id(item) for item in items}
            names = [n for n, p in named.items() if id(p) in wanted]
        else:
            raise TypeError("params as a list must hold only module names or only parameters")
    shapes = tuple(named[n].shape for n in names)
    shared = {name: tied[name] for name in names if name in tied}
    return ParameterSelection(tuple(names), shapes, _linear_head(model, names), shared)


def _parameter_names(model: nn.Module) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Every name of every parameter → its first, the one ``named_parameters()`` lists it
    under (a tied weight has several names, so has each parameter of a module registered
    under several names); and, for each tensor that several modules hold (tied), its first
    name → its other names."""
    canonical: dict[str, str] = {}
    first: dict[int, str] = {}
    holders: dict[int, set[int]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, tensor in module.named_parameters(prefix=module_name, recurse=False,
                                                     remove_duplicate=False):
            canonical[name] = first.setdefault(id(tensor), name)
            holders.setdefault(id(tensor), set()).add(id(module))
    tied = {first[key]: tuple(name for name, name_first in canonical.items()
                              if name_first == first[key] and name != first[key])
            for key, modules in holders.items() if len(modules) > 1}
    return canonical, tied


def _names_of_last_module(
    model: nn.Module,
    named: dict[str, nn.Parameter],
    canonical: dict[str, str],
    example: Inputs | None,
) -> list[str]:
    owners = {name: module for name, module in model.named_modules()
              if any(True for _ in module.parameters(recurse=False))}
    if example is None:
        last_name = list(owners)[-1]
        how = "the last module with parameters in registration order"
    else:
        last_name = _last_to_run(model, owners, example)
        how = "the module whose parameter the example batch uses last"
    own = {canonical[name] for name, _ in owners[last_name].named_parameters(
        prefix=last_name, recurse=False, remove_duplicate=False)}
    names = [n for n in named if n in own and named[n].requires_grad]
    if not names:
        shown = repr(last_name) if last_name else "the model itself"
        raise ValueError(
            f'params="last" found {shown} ({how}), but none of its parameters require grad; '
            'pass params="all" or the names of the modules to take influence over'
        )
    return names


def _last_to_run(model: nn.Module, owners: dict[str, nn.Module], example: Inputs) -> str:
    """The name of the module in ``owners`` that holds the parameter the forward on
    ``example`` uses last: the innermost running module holding it as its own, else its
    first holder (a parameter used functionally, outside its module's forward).

    Parameter use, not which forward finishes last: an enclosing module always finishes
    after its children, so a root holding a token used first (a ViT's ``class_token``) would
    otherwise beat the output layer."""
    holders: dict[int, list[str]] = {}
    for name, module in owners.items():
        for tensor in module.parameters(recurse=False):
            holders.setdefault(id(tensor), []).append(name)
    running: list[str] = []
    last_used: list[str] = []

    def owner_of(ids: list[int]) -> str:
        for name in reversed(running):
            if any(name in holders[key] for key in ids):
                return name
        return holders[ids[-1]][0]

    class ParameterUse(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            ids = [id(tensor) for tensor in tensors_in((args, kwargs)) if id(tensor) in holders]
            if ids:
                last_used.append(owner_of(ids))
            return func(*args, **kwargs)

    def leave(*_args: object) -> None:  # a forward hook's non-None return replaces the output
        running.pop()

    hooks = []
    for name, module in owners.items():
        hooks.append(module.register_forward_pre_hook(
            lambda *_args, name=name: running.append(name)))
        hooks.append(module.register_forward_hook(leave))
    try:
        with eval_mode(model), torch.no_grad(), ParameterUse():
            args, kwargs = model_arguments(example)
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    if not last_used:
        raise ValueError(
            'params="last": the model used none of its parameters on the example batch; pass '
            'params="all" or module names'
        )
    return last_used[-1]


def _names_of_modules(
    model: nn.Module,
    named: dict[str, nn.Parameter],
    canonical: dict[str, str],
    module_names: Sequence[str],
) -> list[str]:
    modules = dict(model.named_modules(remove_duplicate=False))
    chosen: set[str] = set()
    for module_name in module_names:
        if module_name in modules:
            found = [canonical[name] for name, _ in modules[module_name].named_parameters(
                prefix=module_name, remove_duplicate=False)]
        elif module_name in canonical:
            found = [canonical[module_name]]
        else:
            known = ", ".join(repr(n) for n in list(modules)[1:12])
            raise ValueError(
                f"params: no module or parameter named {module_name!r} in the model "
                f"(modules include {known})"
            )
        if not found:
            raise ValueError(f"params: module {module_name!r} has no parameters")
        chosen.update(found)
    return [n for n in named if n in chosen]


def _linear_head(model: nn.Module, names: Sequence[str]) -> nn.Linear | None:
    """The ``nn.Linear`` (or subclass) whose weight and bias are exactly the parameters named
    ``names``, if there is one. Matched by identity, so a tied parameter selected under another
    module's name still finds it (whether the closed form then applies is decided by
    :func:`fastinfluence.hessian.probe.probe_model`)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    selected = [id(named[n]) for n in names]
    for module in model.modules():
        if isinstance(module, nn.Linear):
            own = [id(p) for p in module.parameters(recurse=False)]
            if sorted(own) == sorted(selected):
                return module
    return None
