"""The distillation end to end on a tiny teacher: teacher data, every stage, kill-and-resume, and 2-process DDP.

The data stage runs once per module (3 prompts x 2 samples, 32 px, 8 teacher steps); each stage test trains for a
few iterations only: what is checked is the plumbing (files, metadata, exact resume, rank agreement), while the
objectives' numbers are checked in test_objectives.py.
"""

import csv
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sd35_flash.flash_core.checkpoint import FlashMetadata, component_state_dict, index_checkpoint
from sd35_flash.flash_core.pipeline import FlashPipeline
from sd35_flash.training.cli import main as train_main
from sd35_flash.training.config import ConfigError, config_from_dict, load_config, to_toml
from sd35_flash.training.data import TeacherData, make_teacher_data
from sd35_flash.training.distributed import World
from sd35_flash.training.split import RoutedMMDiT
from sd35_flash.training.trainer import Trainer, run_stages

from factories import tiny_mmdit, write_tiny_checkpoint
from tokenizer_factories import write_tokenizers

# The self-made tokenizer files (tokenizer_factories.py), passed explicitly; not named "tokenizers", the folder a
# checkpoint beside it would pick up by itself.
TOKENIZER_FOLDER = "tokenizer_files"


def base_config(root: Path, **sections) -> dict:
    config = {
        "model": {"teacher": str(root / "teacher.safetensors"), "tokenizers": str(root / TOKENIZER_FOLDER)},
        "data": {"prompts": str(root / "prompts.txt"), "dir": str(root / "data"), "samples_per_prompt": 2,
                 "teacher_steps": 8, "width": 32, "height": 32, "shard_size": 4},
        "train": {"out": str(root / "run"), "batch_size": 4, "checkpoint_every": 2, "log_every": 1},
        "pretrain": {"iterations": 4},
        "dmd": {"iterations": 3, "fake_updates_per_step": 2, "trajectory_weight": 1.0},
        "split": {"iterations": 2},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


@pytest.fixture(scope="module")
def root(module_tmp) -> Path:
    """A tiny teacher, its tokenizers, prompts, and its teacher data (made through the CLI's data stage)."""
    root = module_tmp("train")
    write_tiny_checkpoint(root / "teacher.safetensors")
    write_tokenizers(root / TOKENIZER_FOLDER)
    (root / "prompts.txt").write_text("a red circle\na blue square\n\na green triangle\n")
    (root / "config.toml").write_text(to_toml(config_from_dict(base_config(root))))
    assert train_main([str(root / "config.toml"), "--stage", "data", "--quiet"]) == 0
    return root


def test_teacher_data_is_complete_and_rerun_skips_finished_shards(root):
    data = TeacherData.load(root / "data")
    assert len(data) == 6 and data.has_t5
    assert data.sigmas[0] == 1.0 and data.sigmas[-1] == 0.0 and {0.9, 0.75, 0.5} <= set(data.sigmas)
    assert data.tensors["trajectory"].shape == (6, len(data.sigmas), 16, 4, 4)
    # the first stored point is the noise itself, as the teacher's path starts at sigma 1
    assert torch.equal(data.tensors["trajectory"][:, 0], data.tensors["noise"])
    shard = root / "data" / "shard_00000.safetensors"
    before = shard.stat().st_mtime_ns
    config = load_config(root / "config.toml")
    pipe = FlashPipeline.from_checkpoint(config.model.teacher, tokenizers=config.model.tokenizers, dtype="fp32",
                                         device="cpu")
    make_teacher_data(config, pipe, progress=False)
    assert shard.stat().st_mtime_ns == before  # recorded shards are not made again


class Killed(Exception):
    pass


def load_shards(folder: Path) -> dict[str, torch.Tensor]:
    data = TeacherData.load(folder)
    return {**data.tensors, **{"uncond." + k: v for k, v in data.uncond.items()}}


def test_teacher_data_does_not_depend_on_the_sample_batch_and_resumes_exactly(root, tmp_path):
    """docs/algorithm.md "Stage 0": samples are made ``data.sample_batch`` per teacher forward (here 3 and 1 against
    the fixture's 8, so batches straddle shards), each from its own seed. Conditioning and noise are bitwise the
    same; the trajectories agree to float reassociation (batching changes the matmul shapes). A run killed
    before its second shard resumes with another batch size, keeping the finished shard as written."""
    def config(name: str, sample_batch: int):
        return config_from_dict(base_config(root, data={"dir": str(tmp_path / name), "sample_batch": sample_batch}))

    pipe = FlashPipeline.from_checkpoint(root / "teacher.safetensors", tokenizers=root / TOKENIZER_FOLDER, dtype="fp32",
                                         device="cpu")
    reference = load_shards(root / "data")
    make_teacher_data(config("whole", 3), pipe, progress=False)
    whole = load_shards(tmp_path / "whole")
    assert whole.keys() == reference.keys() and len(whole["noise"]) == 6
    for key in whole:
        if key in ("trajectory", "pooled", "pooled_t5"):
            torch.testing.assert_close(whole[key], reference[key], rtol=0, atol=1e-5, msg=key)
        else:
            assert torch.equal(whole[key], reference[key]), key

    def kill(done, total):
        if done > 4:  # the first shard (4 samples) is written, the second not yet
            raise Killed

    with pytest.raises(Killed):
        make_teacher_data(config("broken", 3), pipe, progress=False, callback=kill)
    first = (tmp_path / "broken" / "shard_00000.safetensors").read_bytes()
    assert first == (tmp_path / "whole" / "shard_00000.safetensors").read_bytes()
    assert not (tmp_path / "broken" / "shard_00001.safetensors").exists()
    with pytest.raises(ConfigError, match="incomplete"):
        TeacherData.load(tmp_path / "broken")
    make_teacher_data(config("broken", 1), pipe, progress=False)
    assert (tmp_path / "broken" / "shard_00000.safetensors").read_bytes() == first
    resumed = load_shards(tmp_path / "broken")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-5, msg=key)
    with pytest.raises(ConfigError, match="data.sample_batch"):
        config("bad", 0)


def test_encoder_dropout_zeroes_the_dropped_clip(root):
    data = TeacherData.load(root / "data")
    keep = data.batch(torch.tensor([0, 1]), True, torch.tensor([False, False]), torch.tensor([False, False]))
    drop = data.batch(torch.tensor([0, 1]), True, torch.tensor([True, False]), torch.tensor([False, True]))
    l_width = data.clip_l_width
    assert drop["context"][0, :77, :l_width].abs().sum() == 0 and drop["pooled"][0, :l_width].abs().sum() == 0
    assert torch.equal(drop["context"][0, :77, l_width:], keep["context"][0, :77, l_width:])
    assert drop["context"][1, :77, l_width:].abs().sum() == 0 and torch.equal(drop["context"][1, 77:],
                                                                              keep["context"][1, 77:])
    no_t5 = data.batch(torch.tensor([0]), False, torch.tensor([False]), torch.tensor([False]))
    assert no_t5["context"].shape == (1, 77, 4096) and keep["context"].shape[1] > 77


def test_all_stages_make_a_checkpoint_that_generates(root, tmp_path):
    config = config_from_dict(base_config(root, train={"out": str(tmp_path / "run"), "sample_every": 2,
                                                       "sample_seeds": [0, 1, 2]}))
    merged = run_stages(config, "all", progress=False)
    grids = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert grids == ["dmd_000002.png", "pretrain_000002.png", "pretrain_000004.png", "split_000002.png"]
    assert Image.open(tmp_path / "run" / "samples" / "dmd_000002.png").size == (3 * 32, 32)
    assert merged.name == "merged.safetensors"
    for name in ("pretrain", "dmd", "branch_high", "branch_low", "merged"):
        assert (tmp_path / "run" / f"{name}.safetensors").exists(), name
    files = index_checkpoint(merged)
    assert all(files.has(c) for c in ("mmdit", "vae", "clip_l", "clip_g", "t5"))
    meta = FlashMetadata.from_safetensors(files.metadata)
    assert meta.student_sigmas == [1.0, 0.9, 0.75, 0.5, 0.0] and meta.sampler_mode == "euler"
    assert meta.training == {"stage": "merge", "iterations": 2, "config_hash": config.hash()}
    high, low = (component_state_dict(index_checkpoint(tmp_path / "run" / f"branch_{n}.safetensors"), "mmdit")
                 for n in ("high", "low"))
    key = "joint_blocks.0.x_block.mlp.fc1.weight"
    assert torch.allclose(component_state_dict(files, "mmdit")[key], 0.5 * high[key] + 0.5 * low[key], atol=1e-6)
    assert (tmp_path / "run" / "config.toml").exists() and (tmp_path / "run" / "log_dmd.csv").exists()
    pipe = FlashPipeline.from_checkpoint(merged, tokenizers=root / TOKENIZER_FOLDER, dtype="fp32", device="cpu")
    image = pipe("a red circle", steps=4, seed=0, width=32, height=32, progress=False)[0]
    assert image.size == (32, 32)


def kill_after(n: int):
    def on_step(stage, step, total, values):
        if step == n:
            raise Killed
    return on_step


@pytest.mark.parametrize("stage", ["pretrain", "dmd"])
def test_killed_and_resumed_run_ends_with_the_same_weights(root, tmp_path, stage):
    sections = {"train": {"out": str(tmp_path / "whole"), "checkpoint_every": 2},
                "pretrain": {"iterations": 4}, "dmd": {"iterations": 4, "fake_warmup_steps": 1}}
    whole = config_from_dict(base_config(root, **sections))
    Trainer(whole, World(), progress=False).run(stage)
    broken = replace(whole, train=replace(whole.train, out=str(tmp_path / "broken")))
    with pytest.raises(Killed):
        Trainer(broken, World(), progress=False, on_step=kill_after(3)).run(stage)  # state saved at step 2
    resumed = Trainer(broken, World(), progress=False)
    resumed.run(stage, resume=True)
    for name in ("student", "fake") if stage == "dmd" else ("student",):
        ours = load_output(tmp_path / "whole" / "state" / stage, name)
        theirs = load_output(tmp_path / "broken" / "state" / stage, name)
        assert ours and ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), f"{stage}: {name} differs after resume"


def load_output(folder: Path, name: str) -> dict[str, torch.Tensor]:
    newest = sorted(folder.glob("step_*.safetensors"))[-1]
    with safe_open(str(newest), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process(root, tmp_path, mode):
    """torchrun with 2 CPU processes (gloo): under DDP both ranks end identical (the trainer checks it and says
    so); under FSDP each holds a shard. Either way the weights equal a single-process run with the same global
    batch, and the state file (gathered whole) resumes in one process."""
    sections = {"pretrain": {"iterations": 3}, "train": {"checkpoint_every": 100}}
    one = config_from_dict(base_config(root, train={**sections["train"], "out": str(tmp_path / "one")},
                                       pretrain=sections["pretrain"]))
    Trainer(one, World(), progress=False).run("pretrain")
    two_path = tmp_path / "two.toml"
    two_path.write_text(to_toml(config_from_dict(base_config(
        root, train={**sections["train"], "out": str(tmp_path / "two")}, pretrain=sections["pretrain"],
        distributed={"fsdp": mode == "fsdp"}))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "sd35_flash.training", str(two_path), "--stage", "pretrain", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    replicas = tmp_path / "two" / "replicas_pretrain.txt"
    if mode == "ddp":
        assert "2 ranks hold identical weights" in replicas.read_text()
    else:
        assert not replicas.exists()  # sharded: the ranks hold different shards, nothing to compare
    single = component_state_dict(index_checkpoint(tmp_path / "one" / "pretrain.safetensors"), "mmdit")
    two = component_state_dict(index_checkpoint(tmp_path / "two" / "pretrain.safetensors"), "mmdit")
    worst = max((single[k] - two[k]).abs().max().item() for k in single)
    print(f"{mode} vs single process, max weight difference after 3 steps: {worst:.2e}")
    assert worst < 1e-5
    one_state, two_state = (load_output(tmp_path / run / "state" / "pretrain", "optim") for run in ("one", "two"))
    assert one_state.keys() == two_state.keys()
    assert max((one_state[k].float() - two_state[k].float()).abs().max().item() for k in one_state) < 1e-4
    if mode == "fsdp":  # resume the sharded run from its gathered state for one more step, and the single run too
        config = load_config(two_path)
        two_path.write_text(to_toml(replace(config, pretrain=replace(config.pretrain, iterations=4))))
        command[command.index("--master_port") + 1] = str(free_port())
        command.append("--resume")
        assert subprocess.run(command, capture_output=True, text=True, env=env, timeout=300).returncode == 0
        Trainer(replace(one, pretrain=replace(one.pretrain, iterations=4)), World(), progress=False).run(
            "pretrain", resume=True)
        single = component_state_dict(index_checkpoint(tmp_path / "one" / "pretrain.safetensors"), "mmdit")
        two = component_state_dict(index_checkpoint(tmp_path / "two" / "pretrain.safetensors"), "mmdit")
        assert max((single[k] - two[k]).abs().max().item() for k in single) < 1e-5


def test_bad_config_is_one_line_with_the_key(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[dmd]\nscore_sample = "shared_later"\n')
    assert train_main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "dmd.score_sample" in err and "shared_next" in err


def test_routed_model_runs_each_branch_on_its_own_timesteps():
    high, low = tiny_mmdit(seed=1), tiny_mmdit(seed=2)
    routed = RoutedMMDiT(high, low, boundary=500.0)
    g = torch.Generator().manual_seed(0)
    x, context, y = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 77, 4096, generator=g), torch.randn(3, 2048)
    t = torch.tensor([900.0, 500.0, 250.0])
    with torch.no_grad():
        out = routed(x, t, context, y)
        assert torch.allclose(out[:1], high(x[:1], t[:1], context[:1], y[:1]), atol=1e-6)
        assert torch.allclose(out[1:], low(x[1:], t[1:], context[1:], y[1:]), atol=1e-6)


def test_a_user_stop_keeps_the_steps_trained_so_far(root, tmp_path):
    """Ctrl-C (or ComfyUI's Cancel, registered by the nodes) saves the state of the last finished step."""
    config = config_from_dict(base_config(root, train={"out": str(tmp_path / "run"), "checkpoint_every": 100},
                                          pretrain={"iterations": 5}))

    def stop(stage, step, total, values):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config, World(), progress=False, on_step=stop).run("pretrain")
    assert [p.name for p in sorted((tmp_path / "run" / "state" / "pretrain").iterdir())] == ["step_000003.safetensors"]
    Trainer(config, World(), progress=False).run("pretrain", resume=True)
    assert (tmp_path / "run" / "state" / "pretrain" / "step_000005.safetensors").exists()


def test_gradient_checkpointing_gives_the_same_weights_and_bf16_autocast_trains(root, tmp_path):
    def run(name: str, **train) -> dict[str, torch.Tensor]:
        config = config_from_dict(base_config(root, train={"out": str(tmp_path / name), **train},
                                              pretrain={"iterations": 2}))
        trainer = Trainer(config, World(), progress=False)
        trainer.run("pretrain")
        return {k: v.detach().clone() for k, v in trainer.models["student"].state_dict().items()}

    plain, checkpointed = run("plain"), run("checkpointed", gradient_checkpointing=True)
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)
    bf16 = run("bf16", autocast="bf16")
    assert all(torch.isfinite(v).all() for v in bf16.values())
    assert any(not torch.equal(plain[k], bf16[k]) for k in plain)  # it trained, in another precision


def test_csv_log_widens_its_header_when_a_row_brings_new_keys(tmp_path):
    from sd35_flash.training.trainer import CSVLog

    log = CSVLog(tmp_path / "log_dmd.csv", enabled=True)
    log.writer = None  # CSV only
    log.write(1, {"fake_loss": 0.5})
    log.write(2, {"fake_loss": 0.4, "generator_loss": 1.5, "g_norm": 2.0})
    log.write(3, {"fake_loss": 0.3})
    import csv

    with (tmp_path / "log_dmd.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "fake_loss", "generator_loss", "g_norm"]
    assert [r["generator_loss"] for r in rows] == ["", "1.5", ""]
    assert [r["fake_loss"] for r in rows] == ["0.5", "0.4", "0.3"]


def test_split_continues_with_dmds_fake_score_or_warms_a_fresh_one_up(root, tmp_path):
    """After DMD in the same folder the split stage starts from DMD's last fake score and updates the branches at
    once; with no DMD state its fresh fake score (a copy of the teacher) is warmed up first (docs/toyworld.md
    "Pitfalls" 1), so a split shorter than the warm-up leaves the branches as they started."""
    sections = {"dmd": {"iterations": 2, "fake_warmup_steps": 3}, "split": {"iterations": 2}}
    after_dmd = config_from_dict(base_config(root, train={"out": str(tmp_path / "a")}, **sections))
    Trainer(after_dmd, World(), progress=False).run("dmd")
    Trainer(after_dmd, World(), progress=False).run("split")
    dmd_fake = load_output(tmp_path / "a" / "state" / "dmd", "fake")
    split_fake = load_output(tmp_path / "a" / "state" / "split", "fake")
    assert dmd_fake.keys() == split_fake.keys()
    start = component_state_dict(index_checkpoint(tmp_path / "a" / "dmd.safetensors"), "mmdit")
    high = component_state_dict(index_checkpoint(tmp_path / "a" / "branch_high.safetensors"), "mmdit")
    assert any(not torch.equal(start[k], high[k]) for k in start)  # the branches trained from the first step

    init = str(tmp_path / "a" / "dmd.safetensors")
    fresh = config_from_dict(base_config(root, train={"out": str(tmp_path / "b")},
                                         model={"student_init": init}, **sections))
    Trainer(fresh, World(), progress=False).run("split")
    high = component_state_dict(index_checkpoint(tmp_path / "b" / "branch_high.safetensors"), "mmdit")
    assert all(torch.equal(start[k], high[k]) for k in start)  # warm-up only: the fake score trained, not them
    log = (tmp_path / "b" / "log_split.csv").read_text()
    assert "high_fake" in log.splitlines()[0] and "high_loss" not in log.splitlines()[0]


def test_the_low_branch_is_rolled_out_through_the_high_branch(root, tmp_path, monkeypatch):
    """The split's low branch learns from the points the high branch's steps reach, as inference (routed or
    merged) runs them; the high branch rolls itself out (docs/algorithm.md "Stage C")."""
    from sd35_flash.training.split import RoutedMMDiT
    from sd35_flash.training.stages import dmd as dmd_stage

    calls = []
    step = dmd_stage.DMDScores.step

    def spy(self, student_model, generator, at, ks=None, rollout_model=None):
        calls.append((ks, rollout_model))
        return step(self, student_model, generator, at, ks, rollout_model)

    monkeypatch.setattr(dmd_stage.DMDScores, "step", spy)
    sections = {"dmd": {"iterations": 1, "fake_warmup_steps": 0}, "split": {"iterations": 1, "boundary": 800.0}}
    run = config_from_dict(base_config(root, train={"out": str(tmp_path / "a")}, **sections))
    Trainer(run, World(), progress=False).run("dmd")
    calls.clear()
    Trainer(run, World(), progress=False).run("split")
    (high_ks, high_rollout), (low_ks, low_rollout) = calls
    assert high_ks == [0, 1] and high_rollout is None
    assert low_ks == [2, 3] and isinstance(low_rollout, RoutedMMDiT) and low_rollout.boundary == 800.0
    assert low_rollout.low is not low_rollout.high


def scores_for(**dmd) -> "object":
    """A DMDScores on a stand-in driver (the options below need no data): a linear fake score."""
    from types import SimpleNamespace

    from sd35_flash.training.stages.dmd import DMDScores

    config = config_from_dict({"dmd": dmd})
    trainer = SimpleNamespace(config=config, wrap=lambda m: m, world=World())
    return DMDScores(trainer, torch.nn.Linear(2, 2))


@pytest.mark.parametrize(("reading", "j"), [("shared_next", 2), ("shared_current", 1)])
def test_a_shared_fake_sample_is_the_point_the_scores_are_read_at(reading, j):
    """``dmd.fake_sample = "shared"``: the fake score is fit at the student's trajectory point where the reading
    reads the scores, with the student's velocity there as its target (docs/algorithm.md "Stage B")."""
    from sd35_flash.training import objectives as obj

    torch.manual_seed(0)
    weight = torch.randn(16, 16) * 0.1
    sigmas = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])
    trajectory = obj.StudentTrajectory(lambda x, s: x @ weight, torch.randn(3, 16), sigmas)
    x0, eps, sigma = scores_for(score_sample=reading, fake_sample="shared").shared_point(trajectory, 1)
    assert torch.equal(sigma, sigmas[j].expand(3))
    assert torch.allclose((1 - sigma[:, None]) * x0 + sigma[:, None] * eps, trajectory.point(j), atol=1e-6)
    assert torch.allclose(eps - x0, trajectory.velocity(j), atol=1e-5)
    last = scores_for(score_sample="shared_next", fake_sample="shared").shared_point(trajectory, 3)
    assert last is None  # sigma 0 after the last step: re-noised there, as the reading is
    assert scores_for(score_sample=reading).shared_point(trajectory, 1) is None  # renoise: the default


def test_shared_fake_samples_need_a_shared_reading():
    with pytest.raises(ConfigError, match="dmd.fake_sample: 'shared' fits the fake score where a shared reading"):
        config_from_dict({"dmd": {"score_sample": "renoise", "fake_sample": "shared"}})


def test_fresh_noise_and_a_fake_batch_of_its_own(root, tmp_path, monkeypatch):
    """``dmd.noise = "fresh"`` rolls the student out from new noise, not the stored teacher noise, and
    ``dmd.fake_batch = "other"`` fits the fake score on a batch the generator step does not score."""
    from sd35_flash.training.stages import dmd as dmd_stage

    seen = {"fake": [], "generator": []}
    update, loss = dmd_stage.DMDScores.update_fake_score, dmd_stage.DMDScores.generator_loss

    def spy_update(self, trajectory, batch, choices, generator):
        seen["fake"].append(batch["noise"].clone())
        return update(self, trajectory, batch, choices, generator)

    def spy_loss(self, student_v, trajectory, batch, choices, generator):
        seen["generator"].append(batch["noise"].clone())
        return loss(self, student_v, trajectory, batch, choices, generator)

    monkeypatch.setattr(dmd_stage.DMDScores, "update_fake_score", spy_update)
    monkeypatch.setattr(dmd_stage.DMDScores, "generator_loss", spy_loss)
    stored = TeacherData.load(root / "data").tensors["noise"]
    runs = {}
    for name, options in (("fresh", {"noise": "fresh", "fake_batch": "other"}), ("again", {"noise": "fresh"})):
        seen = {"fake": [], "generator": []}
        run = config_from_dict(base_config(root, train={"out": str(tmp_path / name)},
                                           dmd={"iterations": 2, "fake_warmup_steps": 0, **options}))
        Trainer(run, World(), progress=False).run("dmd")
        runs[name] = seen
    fresh = runs["fresh"]
    for noise in fresh["generator"]:
        assert not any(torch.equal(noise[0], n) for n in stored)  # not a stored teacher noise
    assert all(not torch.equal(f, g) for f, g in zip(fresh["fake"], fresh["generator"], strict=True))
    same = runs["again"]
    assert all(torch.equal(f, g) for f, g in zip(same["fake"], same["generator"], strict=True))


def test_dmd_logs_the_fake_scores_held_out_loss_and_the_guidance_cosine(root, tmp_path):
    """Every ``log_every`` step (warm-up included) logs the fake score's loss on its fixed held-out batch, and
    every generator step the cosine between the DMD direction and the plain CFG gap; with ``real_cfg = 1``
    there is no gap and no cosine. The held-out batch draws from a generator of its own: the fake score's
    held-out loss at the same weights is the same number (tests/test_training_numbers.py pins that the
    training draws do not move)."""
    from sd35_flash.training.stages import dmd as dmd_stage

    rows = {}
    for name, real_cfg in (("cfg", 2.0), ("plain", 1.0)):
        run = config_from_dict(base_config(root, train={"out": str(tmp_path / name)},
                                           dmd={"iterations": 3, "fake_warmup_steps": 1, "real_cfg": real_cfg}))
        Trainer(run, World(), progress=False).run("dmd")
        with (tmp_path / name / "log_dmd.csv").open(newline="") as f:
            rows[name] = list(csv.DictReader(f))
    cfg_rows = rows["cfg"]
    assert [r["fake_held_out"] != "" for r in cfg_rows] == [True, True, True]
    assert all(float(r["fake_held_out"]) > 0 for r in cfg_rows)
    assert cfg_rows[0]["cfg_cos"] == "" and all(-1 <= float(r["cfg_cos"]) <= 1 for r in cfg_rows[1:])
    assert all(r.get("cfg_cos", "") == "" for r in rows["plain"])

    trainer = Trainer(config_from_dict(base_config(root, train={"out": str(tmp_path / "again")})), World(),
                      progress=False)
    plan = dmd_stage.prepare(trainer)
    scores = dmd_stage.DMDScores(trainer, plan.modules["fake"])
    student = plan.modules["student"]
    first, second = scores.held_out_fake_loss(student), scores.held_out_fake_loss(student)
    assert first == second
    shared = Trainer(config_from_dict(base_config(root, train={"out": str(tmp_path / "shared")},
                                                  dmd={"score_sample": "shared_next", "fake_sample": "shared"})),
                     World(), progress=False)
    at_points = dmd_stage.DMDScores(shared, dmd_stage.prepare(shared).modules["fake"])
    assert at_points.held_out_fake_loss(student) != first  # held out where that fake score is fit
