"""What crosses between the grader and the process that runs a submission, and the one way both call code.

The submission runs in a child process (minirspo/course/sandbox.py starts it, child.py is its main), so
everything it returns reaches the grader as data: JSON lines of nested lists of numbers, never pickle, whose
loading would run the child's code in the grader. `decode` rebuilds plain tensors from checked lists, so an
object that claims to equal anything, or a tensor subclass that overrides `isclose`, arrives as the numbers it
would print, and the grader compares those with its own.

`run_call` is the only way a property calls an implementation: the grader calls the reference with it, the
child calls the submission with it, so both see the same fresh leaves and their gradients come from the same
objective.

This file imports torch only: the child imports it from its scratch folder, where no minirspo package exists.
"""
import copy
import json
import math

import torch
from torch import Tensor, nn

DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}
MAX_ELEMENTS = 1_000_000  # the assignments' tensors have tens of entries: more is a submission flooding the grader
MAX_DEPTH = 8             # outputs are a tensor, a tuple of tensors or a NamedTuple holding a dict of them
PRIMITIVES = (bool, int, float, str, type(None))


def dumps(message: dict) -> bytes:
    """One message as one line of JSON (NaN and Infinity included, as Python's json reads them back)."""
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


# ---------------------------------------------------------------------------------------------------
# Encoding (either side): values to JSON-ready data
# ---------------------------------------------------------------------------------------------------

def encode(value, depth: int = 0):
    """A tensor, module, NamedTuple, tuple, list, dict or primitive as JSON-ready data; anything else by its
    type name and a short repr, so that the grader can say what it got without holding the object."""
    if depth > MAX_DEPTH:
        return _opaque(value)
    if isinstance(value, Tensor):
        plain = value.detach().cpu()
        return {"tensor": str(plain.dtype).removeprefix("torch."), "shape": list(plain.shape),
                "data": plain.reshape(-1).tolist(), "requires_grad": bool(value.requires_grad)}
    if isinstance(value, nn.Module):
        return {"module": type(value).__name__,
                "attributes": {name: attribute for name, attribute in vars(value).items()
                               if not name.startswith("_") and isinstance(attribute, PRIMITIVES)},
                "parameters": {name: encode(parameter) for name, parameter in value._parameters.items()
                               if parameter is not None},
                "children": {name: encode(child, depth + 1) for name, child in value._modules.items()}}
    if type(value) in PRIMITIVES:  # exact types: a str subclass may override anything
        return value
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        return {"record": type(value).__name__,
                "fields": {str(name): encode(item, depth + 1) for name, item in zip(type(value)._fields, value)}}
    if type(value) in (tuple, list):
        return {type(value).__name__: [encode(item, depth + 1) for item in value]}
    if type(value) is dict:
        return {"dict": {str(key): encode(item, depth + 1) for key, item in value.items()}}
    return _opaque(value)


def _opaque(value) -> dict:
    try:
        shown = repr(value)
    except Exception as error:  # a repr that raises is the submission's problem, not the grader's
        shown = f"<repr raised {type(error).__name__}>"
    return {"opaque": type(value).__name__, "repr": shown[:300]}


# ---------------------------------------------------------------------------------------------------
# Decoding: data to values, checking every field (the grader decodes what an untrusted child sent)
# ---------------------------------------------------------------------------------------------------

class Record:
    """A NamedTuple as the grader sees it: fields by name or position, shown as the child named them."""

    def __init__(self, type_name: str, fields: dict):
        self._type_name, self._fields = type_name, fields

    def __getattr__(self, name: str):
        fields = self.__dict__.get("_fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(name)

    def __getitem__(self, index: int):
        return list(self._fields.values())[index]

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"{self._type_name}({', '.join(f'{name}={value!r}' for name, value in self._fields.items())})"


class Opaque:
    """A value the child could not send as data: only its type name and repr."""

    def __init__(self, type_name: str, shown: str):
        self.type_name, self.shown = type_name, shown

    def __repr__(self) -> str:
        return self.shown


def decode(data, *, modules: bool = False, depth: int = 0):
    """The value `encode` made, built from checked fields only; ValueError on anything else. Modules are
    rebuilt only where the grader sent them (the child's inputs), never from what a child sent back."""
    if depth > MAX_DEPTH + 1:
        raise ValueError("nested too deeply")
    if type(data) in PRIMITIVES:
        return data
    if type(data) is not dict or len(data) < 1:
        raise ValueError(f"unexpected {type(data).__name__}")
    if "tensor" in data:
        return _decode_tensor(data)
    if "record" in data:
        return Record(_name(data["record"]), {_name(key): decode(value, modules=modules, depth=depth + 1)
                                               for key, value in _dict(data["fields"]).items()})
    if "tuple" in data or "list" in data:
        items = data.get("tuple", data.get("list"))
        if type(items) is not list:
            raise ValueError("a tuple is a list")
        values = [decode(item, modules=modules, depth=depth + 1) for item in items]
        return tuple(values) if "tuple" in data else values
    if "dict" in data:
        return {str(key): decode(value, modules=modules, depth=depth + 1) for key, value in _dict(data["dict"]).items()}
    if "opaque" in data:
        return Opaque(_name(data["opaque"]), str(data.get("repr", ""))[:300])
    if "module" in data:
        if not modules:
            return Opaque(_name(data["module"]), f"<{_name(data['module'])} module>")
        return _decode_module(data, depth)
    raise ValueError(f"unknown kind {sorted(data)[0]!r}")


def _decode_tensor(data: dict) -> Tensor:
    dtype, shape, values = DTYPES.get(data["tensor"]), data["shape"], data["data"]
    if dtype is None:
        raise ValueError(f"unknown dtype {data['tensor']!r}")
    if type(shape) is not list or not all(type(size) is int and 0 <= size <= MAX_ELEMENTS for size in shape):
        raise ValueError("a shape is a list of sizes")
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS or type(values) is not list or len(values) != numel:
        raise ValueError(f"{numel} entries expected")
    if not all(type(value) in (bool, int, float) for value in values):
        raise ValueError("tensor entries are numbers")
    tensor = torch.tensor(values, dtype=dtype).reshape(shape)
    if data.get("requires_grad") is True and tensor.is_floating_point():
        tensor.requires_grad_(True)  # a flag only: the graph stayed in the child, the gradients come as data
    return tensor


def _decode_module(data: dict, depth: int) -> nn.Module:
    """A stand-in with the sent parameters and attributes: nn.Linear stays callable, others are plain modules."""
    attributes = _dict(data["attributes"])
    parameters = {name: decode(value) for name, value in _dict(data["parameters"]).items()}
    if data["module"] == "Linear":
        module = nn.Linear(attributes["in_features"], attributes["out_features"], bias="bias" in parameters)
    else:
        module = nn.Module()
    for name, value in attributes.items():
        setattr(module, name, value)
    for name, value in parameters.items():
        setattr(module, name, nn.Parameter(value.detach()))
    for name, child in _dict(data["children"]).items():
        setattr(module, name, _decode_module(child, depth + 1))
    return module


def _dict(value) -> dict:
    if type(value) is not dict:
        raise ValueError("expected an object")
    return value


def _name(value) -> str:
    if type(value) is not str or not value.isidentifier():
        raise ValueError("a name is an identifier")
    return value


# ---------------------------------------------------------------------------------------------------
# One call, made the same way on both sides
# ---------------------------------------------------------------------------------------------------

def run_call(function, inputs: dict, leaves: tuple[str, ...] = (), parts: tuple[tuple, ...] = ()):
    """(output, gradients) of `function(**inputs)`. Modules are private copies; each name in `leaves` is a
    tensor argument made a fresh leaf that requires grad, or a module's parameter ("self.router.weight").
    With `parts` (paths into the output: ("loss",), (2,), () for the output itself), the gradients of the
    sum over those parts that carry a gradient of part² (a 0-d part as it is) wrt each leaf, zeros where a
    leaf gets none; gradients is None when no part carries a gradient."""
    inputs = {name: copy.deepcopy(value) if isinstance(value, nn.Module) else value for name, value in inputs.items()}
    for name in leaves:
        if name in inputs:
            inputs[name] = inputs[name].detach().clone().requires_grad_(True)
    leaf_tensors = {name: _lookup(inputs, name) for name in leaves}
    output = function(**inputs)
    chosen = [pick(output, path) for path in parts]
    differentiable = [part for part in chosen if isinstance(part, Tensor) and part.requires_grad]
    if not differentiable:
        return output, None
    objective = sum(part if part.ndim == 0 else part.square().sum() for part in differentiable)
    grads = torch.autograd.grad(objective, list(leaf_tensors.values()), allow_unused=True)
    return output, {name: torch.zeros_like(leaf) if grad is None else grad
                    for (name, leaf), grad in zip(leaf_tensors.items(), grads)}


def pick(output, path: tuple):
    """The part of `output` at `path` (names are attributes, integers positions), None if there is none."""
    for step in path:
        if isinstance(step, int):
            output = output[step] if isinstance(output, (tuple, list, Record)) and -len(output) <= step < len(output) else None
        else:
            output = getattr(output, step, None)
    return output


def _lookup(inputs: dict, dotted: str) -> Tensor:
    first, *rest = dotted.split(".")
    value = inputs[first]
    for name in rest:
        value = getattr(value, name)
    return value
