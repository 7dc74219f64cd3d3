"""``renamed(model)``: same function, every submodule / parameter / buffer renamed.

The copy keeps each module object (and its ``forward``), but its children,
parameters and buffers are stored under meaningless keys ``m0, m1, ...``,
``p0, ...``, ``b0, ...``.  Attribute access through the original names keeps
working because each module's class is swapped for a per-class subclass
whose ``__getattr__``/``__setattr__``/``__delattr__`` translate old names,
so ``forward`` runs unchanged.  The subclass keeps ``__name__`` and
``__qualname__`` of the original class.

After renaming, ``named_parameters()`` yields names like ``m0.m1.m3.p0``,
and a ``torch.export`` of the copy has only such names in its state dict.
Tied parameters stay tied (the same Parameter objects are reused).
"""

from __future__ import annotations

import copy
import operator
from collections import OrderedDict

from torch import nn

_ALIAS = "_zoo_alias"
_CLASS_CACHE: dict[type, type] = {}


def _translate(self, name):
    alias = self.__dict__.get(_ALIAS)
    if alias is not None and isinstance(name, str):
        return alias.get(name, name)
    return name


def _renamed_class(cls: type) -> type:
    if getattr(cls, "_zoo_renamed_class", False):
        return cls
    hit = _CLASS_CACHE.get(cls)
    if hit is not None:
        return hit

    def _getattr(self, name):
        return super(new_cls, self).__getattr__(_translate(self, name))

    def _setattr(self, name, value):
        super(new_cls, self).__setattr__(_translate(self, name), value)

    def _delattr(self, name):
        super(new_cls, self).__delattr__(_translate(self, name))

    def register_buffer(self, name, tensor, persistent=True):
        return super(new_cls, self).register_buffer(_translate(self, name), tensor, persistent)

    def register_parameter(self, name, param):
        return super(new_cls, self).register_parameter(_translate(self, name), param)

    def register_module(self, name, module):
        return super(new_cls, self).register_module(_translate(self, name), module)

    def add_module(self, name, module):
        return super(new_cls, self).add_module(_translate(self, name), module)

    ns = {
        "__getattr__": _getattr,
        "__setattr__": _setattr,
        "__delattr__": _delattr,
        "register_buffer": register_buffer,
        "register_parameter": register_parameter,
        "register_module": register_module,
        "add_module": add_module,
        "_zoo_renamed_class": True,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    if issubclass(cls, nn.ModuleList):
        # ModuleList maps int index -> str(key); map it to the i-th key instead.
        def _get_abs_string_index(self, idx):
            idx = operator.index(idx)
            keys = list(self._modules)
            if not (-len(keys) <= idx < len(keys)):
                raise IndexError(f"index {idx} is out of range")
            return keys[idx]

        ns["_get_abs_string_index"] = _get_abs_string_index
    if issubclass(cls, nn.ModuleDict):

        def _getitem(self, key):
            return self._modules[_translate(self, key)]

        def _contains(self, key):
            return _translate(self, key) in self._modules

        ns["__getitem__"] = _getitem
        ns["__contains__"] = _contains

    new_cls = type(cls.__name__, (cls,), ns)
    _CLASS_CACHE[cls] = new_cls
    return new_cls


def _fresh(prefix: str, i: int, taken: set[str], cls: type) -> str:
    name = f"{prefix}{i}"
    while name in taken or hasattr(cls, name):
        name = "_" + name
    return name


def _rename_one(mod: nn.Module) -> None:
    old_alias = mod.__dict__.get(_ALIAS, {})  # renaming a renamed model: compose
    cls = type(mod)
    alias: dict[str, str] = {}
    taken: set[str] = set()
    tables = (("_modules", "m"), ("_parameters", "p"), ("_buffers", "b"))
    new_tables = {}
    for attr, prefix in tables:
        table = getattr(mod, attr)
        fresh = OrderedDict()
        for i, (key, val) in enumerate(table.items()):
            new = _fresh(prefix, i, taken, cls)
            taken.add(new)
            alias[key] = new
            fresh[new] = val
        new_tables[attr] = fresh
    # non-persistent buffer names
    nps = {alias[n] for n in mod._non_persistent_buffers_set if n in alias}
    for attr, _ in tables:
        object.__setattr__(mod, attr, new_tables[attr])
    object.__setattr__(mod, "_non_persistent_buffers_set", nps)
    # compose with an earlier alias (original name -> previous key -> new key)
    composed = {orig: alias[prev] for orig, prev in old_alias.items() if prev in alias}
    composed.update(alias)
    object.__setattr__(mod, _ALIAS, composed)
    object.__setattr__(mod, "__class__", _renamed_class(cls))


def renamed(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` computing the same function with every name changed."""
    out = copy.deepcopy(model)
    for mod in list(out.modules()):
        _rename_one(mod)
    return out


def is_renamed_name(fqn: str) -> bool:
    """True when every component of a dotted state-dict name is a renamed key."""
    import re

    return all(re.fullmatch(r"_*[mpb]\d+", part) for part in fqn.split("."))
