"""Our node classes' schemas, from one source each: the node table and the training config.

The table of node types (flash_core/node_specs.py, which the graph builder writes graphs from) holds the names,
order, kinds and required/optional split of a node's inputs, its outputs and its title: :func:`inputs` builds
``INPUT_TYPES`` from it and :func:`outputs` gives ``RETURN_TYPES`` / ``RETURN_NAMES``. A node adds only what the
table does not hold: a combo's choices (:func:`combo`), defaults, bounds, steps and tooltips. Options for an
input the table does not have, or none for one it has, are refused when the class is defined.

A training option's widget takes its default, choices and bounds from its field in training/config.py
(:func:`config_widget`), read each time ComfyUI asks for the schema, so a default changed there is what the
node shows and what the example workflow (nodes/workflows.py) holds.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ..flash_core.node_specs import NODE_SPECS, OUR_NODE_TYPES, NodeSpec, Slot
from ..training.config import ALLOWED, Config

UNIQUE_ID = {"unique_id": "UNIQUE_ID"}  # hidden input: the node's id, to show reports and progress on it
TABLE = "flash_core/node_specs.py"
CONFIG = "training/config.py"
TABLE_HELD = ("control_after_generate",)  # options the table decides (Slot.control), never a node
CONFIG_HELD = ("default", "min", "max")  # options a config widget takes from its field
WIDGET_KINDS = {int: "INT", float: "FLOAT", bool: "BOOLEAN", str: "STRING"}  # a config field's type -> widget


@dataclass(frozen=True)
class Input:
    """What a node adds to one input of the table: ComfyUI's input options (tooltip, default, min, max, step...)
    and, for a COMBO, its choices (a callable: listed again each time, as model file lists are)."""

    options: Mapping[str, object]
    choices: Sequence | Callable[[], Sequence] | None = None

    def kind(self) -> str | None:
        """The widget kind this input was made for (a config field's), or None when the table's kind is taken."""
        return None

    def widget_options(self) -> dict[str, object]:
        return dict(self.options)

    def entry(self, slot: Slot) -> tuple:
        """The ``INPUT_TYPES`` entry for ``slot``: ``(TYPE or choices, options)``."""
        options = self.widget_options()
        if slot.control:
            options["control_after_generate"] = True
        if slot.type == "COMBO":
            choices = self.choices() if callable(self.choices) else self.choices
            return list(choices), options
        return slot.type, options


def combo(choices: Sequence | Callable[[], Sequence], **options) -> Input:
    """A COMBO input: ``choices`` (or a callable giving them) and its options."""
    return Input(options, choices)


def _spec(node_type: str) -> NodeSpec:
    if node_type not in OUR_NODE_TYPES:
        raise ValueError(f"'{node_type}' is not one of our node types in {TABLE} ({', '.join(OUR_NODE_TYPES)})")
    return NODE_SPECS[node_type]


def _check(node_type: str, slot: Slot, given: Input) -> None:
    """Refuse options that do not fit the table's slot (a kind, choices, or a fact the table holds)."""
    where = f"{node_type}.{slot.name}"
    held = [k for k in TABLE_HELD if k in given.options]
    if held:
        raise ValueError(f"{where}: {', '.join(held)} comes from {TABLE}, not from the node")
    if (slot.type == "COMBO") != (given.choices is not None):
        raise ValueError(f"{where} is {slot.type} in {TABLE}: "
                         + ("give its choices with combo(...)" if slot.type == "COMBO" else "it takes no choices"))
    if given.kind() not in (None, slot.type):
        raise ValueError(f"{where} is {slot.type} in {TABLE}, but its options are for {given.kind()}")


def inputs(node_type: str, *, hidden: Mapping[str, str] | None = None,
           **given: Input | Mapping[str, object]) -> classmethod:
    """The ``INPUT_TYPES`` classmethod of ``node_type``: the table's inputs, in its order, required then optional,
    each with the options ``given`` for it by name (a plain mapping, or an :class:`Input`), then ``hidden``."""
    spec = _spec(node_type)
    names = [slot.name for slot in spec.inputs]
    unknown = [name for name in given if name not in names]
    if unknown:
        raise ValueError(f"{node_type} has no input {', '.join(unknown)} in {TABLE} (its inputs: {', '.join(names)})")
    missing = [name for name in names if name not in given]
    if missing:
        raise ValueError(f"{node_type}: no options for its input {', '.join(missing)} (from {TABLE})")
    given_inputs = {name: value if isinstance(value, Input) else Input(value) for name, value in given.items()}
    for slot in spec.inputs:
        _check(node_type, slot, given_inputs[slot.name])

    def input_types(cls) -> dict:
        sections: dict[str, dict] = {"required": {}, "optional": {}}
        for slot in spec.inputs:
            sections["optional" if slot.optional else "required"][slot.name] = given_inputs[slot.name].entry(slot)
        schema = {name: entries for name, entries in sections.items() if entries or name == "required"}
        if hidden:
            schema["hidden"] = dict(hidden)
        return schema

    return classmethod(input_types)


def outputs(node_type: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(RETURN_TYPES, RETURN_NAMES)`` of ``node_type`` from the table."""
    spec = _spec(node_type)
    return tuple(kind for _, kind in spec.outputs), tuple(name for name, _ in spec.outputs)


def display_name(node_type: str) -> str:
    """The title the editor shows for ``node_type`` (``NODE_DISPLAY_NAME_MAPPINGS``)."""
    return _spec(node_type).title


# ------------------------------------------------------------------------------------------------ config widgets


@functools.cache
def _config_field(path: str) -> tuple[type, str, object]:
    """``(section class, field name, type)`` of a dotted key of :class:`~..training.config.Config`."""
    owner, *parents, name = [Config, *path.split(".")]
    for part in parents:
        hints = typing.get_type_hints(owner)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            raise ValueError(f"'{path}' is not a key of the training config ({CONFIG}): no table '{part}'")
        owner = hints[part]
    hints = typing.get_type_hints(owner)
    if name not in hints:
        raise ValueError(f"'{path}' is not a key of the training config ({CONFIG})")
    return owner, name, hints[name]


def _widget_kind(path: str, kind) -> str:
    if typing.get_origin(kind) is Literal:
        return "COMBO"
    if kind in WIDGET_KINDS:
        return WIDGET_KINDS[kind]
    raise ValueError(f"config key '{path}' ({kind}) has no widget kind")


@dataclass(frozen=True)
class ConfigWidget(Input):
    """A widget for one training-config key (``path``, dotted as in a TOML config): its default, a combo's
    choices (a ``Literal`` type) and a number's bounds and integer step (the field's ``Allowed`` range) come from
    the field; ``cap`` is the maximum where the config sets none (ComfyUI wants a finite one)."""

    path: str = ""
    cap: float | None = None

    def kind(self) -> str:
        return _widget_kind(self.path, _config_field(self.path)[2])

    def field(self) -> dataclasses.Field:
        owner, name, _ = _config_field(self.path)
        return next(f for f in dataclasses.fields(owner) if f.name == name)

    def default(self):
        field = self.field()
        return field.default_factory() if field.default is dataclasses.MISSING else field.default

    def bounds(self) -> dict[str, object]:
        """``min``, ``max`` and, for an integer multiple, ``step``, from the field's range (and the cap)."""
        spec = self.field().metadata.get(ALLOWED)
        numbers = spec.numbers if spec is not None else None
        if numbers is None or numbers.low is None:
            raise ValueError(f"config key '{self.path}' has no lower bound ({CONFIG}) for its widget's minimum")
        if (numbers.high is None) == (self.cap is None):
            raise ValueError(f"config key '{self.path}': give a cap exactly where {CONFIG} sets no maximum")
        cast = int if self.kind() == "INT" else float
        bounds = {"min": cast(numbers.low), "max": cast(self.cap if numbers.high is None else numbers.high)}
        if numbers.multiple > 1:
            bounds["step"] = numbers.multiple
        return bounds

    def widget_options(self) -> dict[str, object]:
        kind, default = self.kind(), self.default()
        if kind in ("INT", "FLOAT"):
            cast = int if kind == "INT" else float
            return {"default": cast(default), **self.bounds(), **self.options}
        return {"default": default, **self.options}


def config_widget(path: str, *, cap: float | None = None, **options) -> ConfigWidget:
    """The widget of training-config key ``path`` (``"dmd.real_cfg"``): default, choices and bounds from its
    field in training/config.py; ``options`` adds the rest (tooltip, a FLOAT's step, round...). Refused here, at
    definition: a key the config lacks, a kind without a widget, options the field decides, a missing or needless
    ``cap``."""
    held = [k for k in CONFIG_HELD if k in options]
    if held:
        raise ValueError(f"config widget '{path}': {', '.join(held)} comes from {CONFIG}, not from the node")
    widget = ConfigWidget(options, None, path, cap)
    kind = widget.kind()
    if kind == "COMBO":
        widget = dataclasses.replace(widget, choices=typing.get_args(_config_field(path)[2]))
    elif kind in ("INT", "FLOAT"):
        bounds = widget.bounds()
        if "step" in bounds and "step" in options:
            raise ValueError(f"config widget '{path}': step comes from {CONFIG} (a multiple of {bounds['step']})")
    return widget
