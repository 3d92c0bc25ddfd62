"""checkpoint.pt: save, load (refusing what is not ours, never running pickled code), and the
trained model and config it holds."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from fastcifar.config import TrainConfig
from fastcifar.errors import UserError
from fastcifar.model import ResNet18
from fastcifar.runs import CHECKPOINT_FILE, write_atomically

# 2: checkpoints record the number of processes (resume needs the same); 3: plain values only (weights_only)
CHECKPOINT_FORMAT = "fastcifar-checkpoint-3"
MODEL_NAME = "resnet18-cifar10"


def save_checkpoint(path: Path, state: dict) -> None:
    state = {"format": CHECKPOINT_FORMAT, "model_name": MODEL_NAME, **state}
    write_atomically(path, lambda file: torch.save(state, file))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint file, or the one in a run folder; refuses files that are not ours."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: pass a run folder or its {CHECKPOINT_FILE}")
    try:
        # weights_only: a checkpoint from elsewhere may hold pickled code, and this never runs it.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds objects a {CHECKPOINT_FORMAT} file never does (it is older, or not from "
                        "fastcifar): train again with `fastcifar train`") from None
    except Exception as e:  # torch.load raises many types for a bad file
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): it may be truncated") from None
    if not isinstance(state, dict) or state.get("model_name") != MODEL_NAME:
        raise UserError(f"{path} is not a fastcifar {MODEL_NAME} checkpoint: train one with `fastcifar train`")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is a {state.get('format')} checkpoint, this fastcifar reads {CHECKPOINT_FORMAT}: "
                        "train again with `fastcifar train`, or use the fastcifar version that wrote it")
    return state


def load_model(path: Path | str, device: str | torch.device = "cpu") -> tuple[ResNet18, tuple[str, ...]]:
    """The trained model of a run folder or checkpoint file, fp32 in eval mode, and its class names."""
    state = load_checkpoint(Path(path))
    return model_of(state).to(device), tuple(state["classes"])


def model_of(state: dict) -> ResNet18:
    model = ResNet18(len(state["classes"]))
    model.load_state_dict(state["model_state"])
    return model.eval()


def config_of(state: dict) -> TrainConfig:
    return TrainConfig.from_dict(state["config"])
