"""The pack inside a real ComfyUI server (``main.py --cpu``), driven over HTTP and the websocket as users do.

A temporary base directory holds ``custom_nodes/ComfyUI-SD35-Flash`` (a link to this checkout) and a small
random-weight SD3.5-shaped checkpoint under the names the example workflows use. Then:
* every pack node registers, with no import failure, and the web extension is served;
* every API-format example workflow runs to a saved image, and the loader's report reaches the websocket;
* the graph that ``sd35-flash generate`` embeds in its PNG, posted back, makes the same image;
* a bad checkpoint fails with a one-sentence error naming the file, as the error dialog shows it.
"""

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd35_flash import NODE_CLASS_MAPPINGS
from sd35_flash.flash_core import cli
from sd35_flash.flash_core.checkpoint import FlashMetadata, save_checkpoint
from sd35_flash.flash_core.mmdit import MMDiTConfig

from factories import text_state_dict, tiny_clip_g, tiny_clip_l, tiny_mmdit, tiny_t5, tiny_vae

REPO = Path(__file__).resolve().parents[2]
PACK = "ComfyUI-SD35-Flash"
EXAMPLES = sorted((REPO / "example_workflows" / "api").glob("*.json"))
# Big enough a position table for 1024 px workflows; otherwise the test model's shape.
MMDIT = MMDiTConfig(depth=3, hidden_size=192, pos_embed_max_size=64, dual_attention_layers=(0,), qk_norm=True)


def write_checkpoint(path: Path) -> Path:
    meta = FlashMetadata(student_sigmas=[1.0, 0.9, 0.75, 0.5, 0.0], sampler_mode="euler")
    return save_checkpoint(path, mmdit=tiny_mmdit(MMDIT), vae=tiny_vae(), clip_l=text_state_dict(tiny_clip_l()),
                           clip_g=text_state_dict(tiny_clip_g()), t5=text_state_dict(tiny_t5()), metadata=meta)


def checkpoint_names() -> set[str]:
    names = {"tiny_flash.safetensors"}
    for path in EXAMPLES:
        names |= {node["inputs"]["ckpt_name"] for node in json.loads(path.read_text()).values()
                  if node["class_type"] == "SD35FlashCheckpointLoader"}
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def post(url: str, body: dict):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    first = write_checkpoint(checkpoints / "tiny_flash.safetensors")
    for name in checkpoint_names() - {first.name}:
        (checkpoints / name).symlink_to(first)
    port, log = free_port(), open(base / "comfyui.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    process = subprocess.Popen(
        [sys.executable, str(Path(os.environ["COMFYUI_ROOT"]) / "main.py"), "--cpu", "--base-directory", str(base),
         "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.environ["COMFYUI_ROOT"])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            get(f"{url}/system_stats")
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"ComfyUI did not start:\n{(base / 'comfyui.log').read_text()[-3000:]}")
            time.sleep(1)
    yield {"url": url, "base": base, "log": base / "comfyui.log"}
    process.terminate()
    process.wait(30)
    log.close()


def run_prompt(server, prompt: dict, timeout: float = 300) -> tuple[dict, list]:
    """Post an API prompt, collect the websocket messages until it finishes, return (history entry, messages)."""
    import aiohttp

    client_id = uuid.uuid4().hex

    async def go():
        messages = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server['url']}/ws?clientId={client_id}") as ws:
                async with session.post(f"{server['url']}/prompt",
                                        json={"prompt": prompt, "client_id": client_id}) as response:
                    body = await response.json()
                    assert response.status == 200, body
                prompt_id = body["prompt_id"]
                async for message in ws:
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue
                    event = json.loads(message.data)
                    messages.append(event)
                    data = event.get("data", {})
                    if data.get("prompt_id") == prompt_id and event["type"] in ("execution_success",
                                                                                 "execution_error"):
                        break
        return prompt_id, messages

    prompt_id, messages = asyncio.run(asyncio.wait_for(go(), timeout))
    for _ in range(300):  # the history entry is written just after the execution_success event is sent
        history = get(f"{server['url']}/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id], messages
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} finished but has no history entry after 30 s")


def saved_images(server, entry: dict) -> list[Path]:
    out = server["base"] / "output"
    return [out / image["subfolder"] / image["filename"]
            for node in entry["outputs"].values() for image in node.get("images", [])]


def test_every_pack_node_registers_without_import_errors(server):
    pack_lines = [line for line in server["log"].read_text().splitlines() if PACK in line]
    # only the pack's own lines: ComfyUI's unrelated import failures (its audio nodes without torchaudio) are not ours
    assert pack_lines and not [line for line in pack_lines if "IMPORT FAILED" in line or "Cannot import" in line]
    info = get(f"{server['url']}/object_info")
    for name in NODE_CLASS_MAPPINGS:
        assert name in info, name
        assert info[name]["python_module"] == f"custom_nodes.{PACK}"
    assert "tiny_flash.safetensors" in info["SD35FlashCheckpointLoader"]["input"]["required"]["ckpt_name"][0]
    extensions = get(f"{server['url']}/extensions")
    assert f"/extensions/{PACK}/js/sd35_flash.js" in extensions
    for script in ("sd35_flash.js", "train_chart_ext.js"):  # served once: each would register its extension twice
        assert sum(url.endswith(f"/js/{script}") for url in extensions) == 1, extensions


def test_example_workflows_are_listed_as_templates(server):
    templates = get(f"{server['url']}/workflow_templates")
    assert sorted(templates[PACK]) == sorted(p.stem for p in EXAMPLES)


SMALL_TRAINING = {"SD35FlashTrainSetup": {"width": 32, "height": 32, "samples_per_prompt": 1, "batch_size": 2},
                  "SD35FlashTrainData": {"teacher_steps": 4}, "SD35FlashTrainPretrain": {"iterations": 2},
                  "SD35FlashTrainDMD": {"iterations": 2, "fake_updates_per_step": 1},
                  "SD35FlashTrainSplit": {"iterations": 2}, "EmptySD3LatentImage": {"width": 32, "height": 32}}


def small(prompt: dict) -> dict:
    """The training template at test size (a few iterations of 32 px); other workflows as they are."""
    if not any(n["class_type"] == "SD35FlashTrainSetup" for n in prompt.values()):
        return prompt
    for node in prompt.values():
        node["inputs"].update(SMALL_TRAINING.get(node["class_type"], {}))
    return prompt


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_workflow_runs_to_a_saved_image(server, path):
    prompt = small(json.loads(path.read_text()))
    entry, messages = run_prompt(server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = saved_images(server, entry)
    assert images and all(Image.open(p).size[0] >= 16 for p in images)
    loader = next(i for i, n in prompt.items() if n["class_type"] == "SD35FlashCheckpointLoader")
    if any(n["class_type"] == "SD35FlashTrainSetup" for n in prompt.values()):
        progress = [m["data"] for m in messages if m["type"] == "sd35_flash.train_progress"]
        assert {p["stage"] for p in progress} == {"pretrain", "dmd", "split"}
        assert any(p["step"] == 2 and p["values"].get("loss") is not None for p in progress)
        assert (server["base"] / "models" / "checkpoints" / "sd35_flash_student_00001_.safetensors").exists()
    cached = {n for m in messages if m["type"] == "execution_cached" for n in m["data"]["nodes"]}
    reports = [m["data"] for m in messages if m["type"] == "sd35_flash.loader_info"]
    if loader not in cached:  # a loader that ran (rather than came from ComfyUI's cache) reported what it found
        assert [r["node"] for r in reports] == [loader]
        assert reports[0]["info"]["architecture"].startswith("custom MM-DiT-X")


def test_the_graph_in_a_cli_png_makes_the_same_image(server, comfy_tokenizers, tmp_path):
    checkpoint = server["base"] / "models" / "checkpoints" / "tiny_flash.safetensors"
    out = tmp_path / "cli.png"
    assert cli.main(["generate", "-c", str(checkpoint), "--tokenizers", str(comfy_tokenizers), "-p", "a blue square",
                     "-o", str(out), "--width", "128", "--height", "96", "--seed", "11", "--dtype", "fp32",
                     "--device", "cpu", "--quiet"]) == 0
    prompt = json.loads(Image.open(out).text["prompt"])
    entry, _ = run_prompt(server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (saved,) = saved_images(server, entry)
    ours, theirs = (np.asarray(Image.open(p).convert("RGB")).astype(np.float64) for p in (saved, out))
    mse = ((ours - theirs) ** 2).mean()
    psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
    print(f"ComfyUI server vs CLI: PSNR {psnr:.1f} dB")
    assert psnr >= 40


def test_a_bad_checkpoint_fails_with_one_sentence_naming_it(server):
    bad = server["base"] / "models" / "checkpoints" / "not_sd3.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(bad))
    prompt = {"1": {"class_type": "SD35FlashCheckpointLoader",
                    "inputs": {"ckpt_name": bad.name, "t5": "auto", "weight_dtype": "auto"}},
              "2": {"class_type": "VAEDecode", "inputs": {"vae": ["1", 2], "samples": ["3", 0]}},
              "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bad"}}}
    entry, messages = run_prompt(server, prompt)
    assert entry["status"]["status_str"] == "error"
    (error,) = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert error["node_type"] == "SD35FlashCheckpointLoader"
    assert bad.name in error["exception_message"] and "\n" not in error["exception_message"].strip()
