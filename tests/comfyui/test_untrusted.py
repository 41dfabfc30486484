"""An untrusted workflow posted to a real ComfyUI server (``main.py --cpu``, the server of test_server.py) cannot
make our nodes read or write outside ComfyUI's folders (GitHub issue 13; the node-level cases are in
tests/test_untrusted_paths.py): each prompt fails with one sentence naming the key, and nothing is written."""

import pytest
from test_server import run_prompt, server  # noqa: F401  (the server fixture, started once for this module)

TEACHER = "tiny_flash.safetensors"


def setup_then_save(config_toml: str = "", training=None) -> dict:
    """Flash Distillation Setup -> Save Flash Checkpoint (an output node, so that Setup runs)."""
    setup = {"teacher": TEACHER, "prompts": "a red circle", "run_name": "untrusted", "student_steps": 4,
             "width": 32, "height": 32, "samples_per_prompt": 1, "batch_size": 1, "seed": 0,
             "config_toml": config_toml}
    save = {"training": training if training is not None else ["1", 0], "stage": "latest", "filename": "stolen"}
    return {"1": {"class_type": "SD35FlashTrainSetup", "inputs": setup},
            "2": {"class_type": "SD35FlashTrainSave", "inputs": save}}


@pytest.fixture(scope="module")
def outside(server, tmp_path_factory):  # noqa: F811
    """A folder outside ComfyUI's, a secret in it, and a link to the secret inside ComfyUI's input/."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (server["base"] / "input").mkdir(exist_ok=True)
    (server["base"] / "input" / "secret.txt").symlink_to(folder / "passwd")
    return folder


@pytest.mark.parametrize("config_toml, node, expected", [
    ('[train]\nout = "{outside}/evil"', "SD35FlashTrainSetup",
     "config_toml: [train] out '{outside}/evil' is an absolute path: it must stay inside ComfyUI's output folder"),
    ('[data]\nprompts = "/etc/passwd"', "SD35FlashTrainSetup",
     "config_toml: [data] prompts '/etc/passwd' is an absolute path"),
    ('[data]\nprompts = "secret.txt"', "SD35FlashTrainSetup",
     "config_toml: [data] prompts 'secret.txt' leads out through a symbolic link"),
    (None, "SD35FlashTrainSave", "training must be linked from Flash Distillation Setup"),
], ids=["train.out", "data.prompts", "link in input", "training value"])
def test_a_prompt_reaching_outside_comfyuis_folders_fails_naming_the_key(server, outside, config_toml, node,  # noqa: F811
                                                                          expected):
    training = {"train": {"out": str(outside / "evil")}} if config_toml is None else None
    prompt = setup_then_save((config_toml or "").replace("{outside}", str(outside)), training)
    entry, messages = run_prompt(server, prompt)
    assert entry["status"]["status_str"] == "error"
    (error,) = [m["data"] for m in messages if m["type"] == "execution_error"]
    message = error["exception_message"].strip()
    assert error["node_type"] == node and expected.replace("{outside}", str(outside)) in message, message
    assert "\n" not in message
    assert sorted(p.name for p in outside.iterdir()) == ["passwd"]  # no evil/ made
    assert not (server["base"] / "output" / "sd35_flash" / "untrusted").exists()
    assert not list((server["base"] / "models" / "checkpoints").glob("stolen*"))
