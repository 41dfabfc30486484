"""Training state on disk (training/state.py): exact resume of weights + AdamW, EMA dicts, keep_last, no pickle."""

import json

import pytest
import torch
from safetensors import safe_open

from sd35_flash.training.state import list_states, load_state, save_state


def make_model(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def make_optimizer(model: torch.nn.Module, lr: float = 0.1) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.8, 0.95), weight_decay=0.01)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def trained(steps: int = 2):
    model = make_model(0)
    optimizer = make_optimizer(model)
    for step in range(steps):
        train_step(model, optimizer, step)
    return model, optimizer


def test_model_and_adamw_round_trip_exactly(tmp_path):
    model, optimizer = trained()
    ema = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    path = save_state(tmp_path, 2, {"student": model, "ema": ema}, {"student": optimizer},
                      {"stage": "dmd", "note": [1, 2]}, keep_last=3)
    assert path == tmp_path / "step_000002.safetensors" and path.is_file()

    model2 = make_model(1)  # different initial weights and learning rate, to be overwritten
    optimizer2 = make_optimizer(model2, lr=0.5)
    ema2 = {k: torch.zeros_like(v) for k, v in ema.items()}
    targets = {k: v for k, v in ema2.items()}
    step, extra = load_state(path, {"student": model2, "ema": ema2}, {"student": optimizer2})
    assert step == 2 and extra == {"stage": "dmd", "note": [1, 2]}

    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for k in ema:
        assert torch.equal(ema2[k], ema[k]) and ema2[k] is targets[k]  # loaded in place into the same tensors

    original, restored = optimizer.state_dict(), optimizer2.state_dict()
    assert restored["param_groups"][0]["lr"] == 0.1
    assert tuple(restored["param_groups"][0]["betas"]) == (0.8, 0.95)
    assert restored["state"].keys() == original["state"].keys() == {0, 1}
    for index, values in original["state"].items():
        assert restored["state"][index].keys() == values.keys()
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(restored["state"][index][key]), torch.as_tensor(value)), key
    assert float(original["state"][0]["step"]) == 2.0

    # one more step from the restored state lands exactly where the original run goes
    train_step(model, optimizer, 2)
    train_step(model2, optimizer2, 2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_plain_tensor_dicts_round_trip(tmp_path):
    ema = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5], dtype=torch.bfloat16),
           "n": torch.tensor([3, 4], dtype=torch.int64)}
    path = save_state(tmp_path, 7, {"ema": ema}, {}, {}, keep_last=1)
    restored = {k: torch.zeros_like(v) for k, v in ema.items()}
    assert load_state(path, {"ema": restored}, {}) == (7, {})
    for k in ema:
        assert restored[k].dtype == ema[k].dtype and torch.equal(restored[k], ema[k])


def test_missing_tensor_in_the_saved_state_is_refused(tmp_path):
    path = save_state(tmp_path, 1, {"ema": {"w": torch.ones(2)}}, {}, {}, keep_last=1)
    with pytest.raises(ValueError, match="ema.b"):
        load_state(path, {"ema": {"w": torch.zeros(2), "b": torch.zeros(1)}}, {})
    with pytest.raises((ValueError, RuntimeError), match="bias"):  # modules load strictly
        load_state(path, {"ema": torch.nn.Linear(2, 1)}, {})


def test_keep_last_deletes_older_files(tmp_path):
    model, optimizer = trained(1)
    for step in (1, 2, 3, 4, 5):
        save_state(tmp_path, step, {"student": model}, {"student": optimizer}, {}, keep_last=2)
    assert [p.name for p in list_states(tmp_path)] == ["step_000004.safetensors", "step_000005.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004.safetensors", "step_000005.safetensors"]


def test_states_are_ordered_by_step_number_not_by_name(tmp_path):
    tensors = {"ema": {"w": torch.ones(1)}}
    save_state(tmp_path, 999_999, tensors, {}, {}, keep_last=2)
    save_state(tmp_path, 1_000_000, tensors, {}, {}, keep_last=2)
    (tmp_path / "notes.txt").write_text("not a state")
    assert [p.name for p in list_states(tmp_path)] == ["step_999999.safetensors", "step_1000000.safetensors"]
    save_state(tmp_path, 1_000_001, tensors, {}, {}, keep_last=1)
    assert [p.name for p in list_states(tmp_path)] == ["step_1000001.safetensors"]
    assert (tmp_path / "notes.txt").exists()
    assert list_states(tmp_path / "missing") == []


def test_the_state_file_is_safetensors_without_pickle(tmp_path):
    model, optimizer = trained()
    path = save_state(tmp_path, 2, {"student": model}, {"student": optimizer}, {"stage": "pretrain"}, keep_last=1)
    raw = path.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8:8 + header_size])  # a JSON header, not a pickle stream
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["sd35_flash.state"])
        assert torch.equal(f.get_tensor("student.weight"), model.weight.detach())
    assert {"student.weight", "student.bias"} <= keys
    optim_keys = [k for k in keys if k.startswith("optim.student.")]
    for moment in ("exp_avg", "exp_avg_sq", "step"):  # both parameters' AdamW state is stored as tensors
        assert sum(k.endswith(moment) and not k.endswith("_" + moment) for k in optim_keys) == 2, moment
    assert len(optim_keys) == 6
    assert meta["step"] == 2 and meta["extra"] == {"stage": "pretrain"}
    assert meta["optimizers"]["student"]["param_groups"][0]["lr"] == 0.1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the atomic write left nothing behind
