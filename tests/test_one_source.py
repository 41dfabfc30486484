"""One source for each fact of the node schemas: the node table (flash_core/node_specs.py) gives every node its
inputs, outputs and title, and the training config (training/config.py) every training widget its default,
choices and bounds, which the training example workflow (nodes/workflows.py) holds too."""

import dataclasses
import types

import pytest

from sd35_flash.flash_core.node_specs import NODE_SPECS
from sd35_flash.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, schema, workflows
from sd35_flash.training.config import (
    ALLOWED,
    SCORE_SAMPLES,
    Allowed,
    Config,
    DataConfig,
    DMDConfig,
    PretrainConfig,
    Range,
    TrainConfig,
)

# (node type, widget) -> the config key it sets
CONFIG_WIDGETS = {
    ("SD35FlashTrainSetup", "student_steps"): "student.steps",
    ("SD35FlashTrainSetup", "width"): "data.width",
    ("SD35FlashTrainSetup", "height"): "data.height",
    ("SD35FlashTrainSetup", "samples_per_prompt"): "data.samples_per_prompt",
    ("SD35FlashTrainSetup", "batch_size"): "train.batch_size",
    ("SD35FlashTrainSetup", "seed"): "train.seed",
    ("SD35FlashTrainData", "teacher_steps"): "data.teacher_steps",
    ("SD35FlashTrainData", "teacher_cfg"): "data.teacher_cfg",
    ("SD35FlashTrainPretrain", "iterations"): "pretrain.iterations",
    ("SD35FlashTrainPretrain", "lr"): "pretrain.optim.lr",
    ("SD35FlashTrainPretrain", "loss"): "pretrain.loss",
    ("SD35FlashTrainDMD", "iterations"): "dmd.iterations",
    ("SD35FlashTrainDMD", "lr"): "dmd.optim.lr",
    ("SD35FlashTrainDMD", "score_sample"): "dmd.score_sample",
    ("SD35FlashTrainDMD", "real_cfg"): "dmd.real_cfg",
    ("SD35FlashTrainDMD", "fake_updates_per_step"): "dmd.fake_updates_per_step",
    ("SD35FlashTrainDMD", "trajectory_weight"): "dmd.trajectory_weight",
    ("SD35FlashTrainSplit", "iterations"): "split.iterations",
    ("SD35FlashTrainSplit", "lr"): "dmd.optim.lr",
    ("SD35FlashTrainSplit", "boundary"): "split.boundary",
    ("SD35FlashTrainSplit", "merge_alpha"): "split.merge_alpha",
    ("SD35FlashTrainMerge", "merge_alpha"): "split.merge_alpha",
}


def widget(node_type: str, name: str) -> tuple:
    """``(TYPE or choices, options)`` of a widget of one of our nodes."""
    inputs = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    return {**inputs["required"], **inputs.get("optional", {})}[name]


def field(cls, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def example_inputs(node_type: str) -> dict:
    api, _ = workflows.training_graph()
    (node,) = [n["inputs"] for n in api.values() if n["class_type"] == node_type]
    return node


def config_value(path: str):
    value = Config()
    for part in path.split("."):
        value = getattr(value, part)
    return value


def test_a_default_changed_in_the_config_is_the_nodes_and_the_examples(monkeypatch):
    monkeypatch.setattr(field(DMDConfig, "real_cfg"), "default", 3.5)
    monkeypatch.setattr(field(PretrainConfig, "iterations"), "default", 77)
    assert widget("SD35FlashTrainDMD", "real_cfg")[1]["default"] == 3.5
    assert widget("SD35FlashTrainPretrain", "iterations")[1]["default"] == 77
    assert example_inputs("SD35FlashTrainDMD")["real_cfg"] == 3.5
    assert example_inputs("SD35FlashTrainPretrain")["iterations"] == 77


def test_a_range_changed_in_the_config_is_the_widgets(monkeypatch):
    allowed = Allowed(numbers=Range(32, 2048, multiple=32))
    monkeypatch.setattr(field(DataConfig, "width"), "metadata", types.MappingProxyType({ALLOWED: allowed}))
    options = widget("SD35FlashTrainSetup", "width")[1]
    assert (options["min"], options["max"], options["step"]) == (32, 2048, 32)
    assert widget("SD35FlashTrainSetup", "height")[1]["max"] == 16384  # its own field, untouched


def test_score_sample_choices_are_the_configs():
    choices, options = widget("SD35FlashTrainDMD", "score_sample")
    assert choices == list(SCORE_SAMPLES) and options["default"] == DMDConfig().score_sample


@pytest.mark.parametrize(("node_type", "name"), sorted(CONFIG_WIDGETS))
def test_training_widget_shows_its_config_key(node_type, name):
    kind, options = widget(node_type, name)
    assert options["default"] == config_value(CONFIG_WIDGETS[node_type, name])
    if kind in ("INT", "FLOAT"):
        assert options["min"] <= options["default"] <= options["max"] < float("inf")


def test_the_seed_widget_fits_both_seeds_it_sets():
    options = widget("SD35FlashTrainSetup", "seed")[1]
    for cls in (DataConfig, TrainConfig):
        numbers = field(cls, "seed").metadata[ALLOWED].numbers
        assert numbers.allows(options["min"]) and numbers.allows(options["max"]), cls.__name__
    assert options["control_after_generate"] is True  # the table's seed:INT*


def test_titles_and_outputs_come_from_the_table():
    for name, cls in NODE_CLASS_MAPPINGS.items():
        spec = NODE_SPECS[name]
        assert NODE_DISPLAY_NAME_MAPPINGS[name] == spec.title
        assert list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES, strict=True)) == list(spec.outputs)


def test_the_training_example_takes_widget_values_by_node():
    api, _ = workflows.training_graph(SD35FlashTrainDMD={"iterations": 10}, SD35FlashTrainSetup={"seed": 3})
    inputs = {n["class_type"]: n["inputs"] for n in api.values()}
    assert inputs["SD35FlashTrainDMD"]["iterations"] == 10
    assert inputs["SD35FlashTrainSetup"]["seed"] == inputs["SD35FlashSampler"]["seed"] == 3
    with pytest.raises(ValueError, match="SD35FlashTrainDMD has no widget realcfg"):
        workflows.training_graph(SD35FlashTrainDMD={"realcfg": 1.0})
    with pytest.raises(ValueError, match="has no node SD35FlashSampler"):
        workflows.training_graph(SD35FlashSampler={"cfg": 2.0})


# ------------------------------------------------------------------------------------------------ refusals


TIP = {"tooltip": "t"}
SCHEDULER = {"model": TIP, "steps": {"default": 4, "min": 1, "max": 9, **TIP}, "denoise": TIP}


def test_inputs_takes_exactly_the_tables_inputs():
    assert schema.inputs("SD35FlashScheduler", **SCHEDULER).__func__(None)["required"]["steps"][0] == "INT"
    with pytest.raises(ValueError, match="SD35FlashScheduler has no input shift"):
        schema.inputs("SD35FlashScheduler", **SCHEDULER, shift=TIP)
    with pytest.raises(ValueError, match="no options for its input denoise"):
        schema.inputs("SD35FlashScheduler", model=TIP, steps=TIP)
    with pytest.raises(ValueError, match="'CLIPTextEncode' is not one of our node types"):
        schema.inputs("CLIPTextEncode", text=TIP, clip=TIP)


def test_inputs_refuses_options_of_the_wrong_kind():
    with pytest.raises(ValueError, match="SD35FlashScheduler.steps is INT.*takes no choices"):
        schema.inputs("SD35FlashScheduler", **{**SCHEDULER, "steps": schema.combo([1, 2], **TIP)})
    with pytest.raises(ValueError, match=r"SD35FlashVAELoader.vae_name is COMBO.*combo\(\.\.\.\)"):
        schema.inputs("SD35FlashVAELoader", vae_name=TIP)
    with pytest.raises(ValueError, match="control_after_generate comes from"):
        schema.inputs("SD35FlashScheduler", **{**SCHEDULER, "steps": {"control_after_generate": True, **TIP}})
    with pytest.raises(ValueError, match="SD35FlashScheduler.denoise is FLOAT.*for INT"):
        schema.inputs("SD35FlashScheduler", **{**SCHEDULER, "denoise": schema.config_widget("dmd.iterations",
                                                                                           cap=10, **TIP)})


def test_config_widget_refuses_what_the_config_decides_or_lacks():
    with pytest.raises(ValueError, match="default comes from training/config.py"):
        schema.config_widget("dmd.real_cfg", default=1.0)
    with pytest.raises(ValueError, match="'dmd.real_cgf' is not a key"):
        schema.config_widget("dmd.real_cgf")
    with pytest.raises(ValueError, match="no table 'dmdd'"):
        schema.config_widget("dmdd.real_cfg")
    with pytest.raises(ValueError, match="give a cap exactly where"):
        schema.config_widget("dmd.iterations")  # no maximum in the config: a cap is needed
    with pytest.raises(ValueError, match="give a cap exactly where"):
        schema.config_widget("dmd.real_cfg", cap=10.0)  # the config's maximum holds
    with pytest.raises(ValueError, match="step comes from"):
        schema.config_widget("data.width", step=8)
    with pytest.raises(ValueError, match="has no widget kind"):
        schema.config_widget("train.sample_seeds")
