"""The training-state file format: everything a resume needs, next to every checkpoint.

At every checkpoint the loop also writes ``training_state/state-NNNNNN.safetensors`` (the LoRA weights in
float32, AdamW's moments and step counts, every random-number state: torch's global CPU and CUDA states, the
loop's noise generator and its mask generator — the whole "data/augmentation" state; a set's image order is a pure
function of the seed and the step, ``trainer.training.schedule``, so it needs no state) and
``state-NNNNNN.json`` next to it (step, optimizer hyper-parameters, the parameter names in order, a
fingerprint of the settings, and the SHA-256 of the tensor file). No pickle anywhere: tensors are
safetensors, everything else is JSON. Both files are written atomically and the JSON last, so it is the
commit mark: a state without its JSON, or whose tensor file does not match the recorded checksum, is
damaged (``DamagedState``).

Restoring all of it (``apply_weights``, ``apply_rng``) makes a resumed CPU run bit-identical to one never
interrupted. Picking which state to resume from, and tidying the run folder, is ``trainer.runs.lifecycle``.
This module never reads or writes ``run.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from trainer.errors import UserError
from trainer.fsutil import atomic_write_bytes, atomic_write_json
from trainer.model import weights
from trainer.runs.folder import RunFolder

log = logging.getLogger(__name__)

STATE_DIR = "training_state"
STATE_FORMAT = 1
WRITER = "one-image-lora"
MAX_JSON_BYTES = 4 * 1024 * 1024
# The settings that shape the training math: a state only resumes a run with exactly these.
TRAINING_FIELDS = ("model", "name", "caption", "trigger", "rank", "learning_rate", "weight_decay", "max_grad_norm",
                   "seed", "resolution", "max_text_tokens", "guidance_scale", "logit_mean", "logit_std",
                   "gradient_checkpointing", "masked", "background_weight", "normalize_mask", "unmasked_probability",
                   "augment_probability")
# Settings added later, with the value every earlier run trained with: in the fingerprint only when they differ from
# it, so the states of earlier runs still resume.
LATER_FIELDS = {"batch_size": 1}
STATE_NAME = re.compile(r"^state-(\d{6,})\.json$")


class DamagedState(UserError):
    """A training state that can't be used (missing, truncated, checksum mismatch, wrong keys)."""


@dataclass
class TrainingState:
    step: int
    param_names: list[str]
    lora: dict[str, torch.Tensor]
    optimizer: dict  # a torch optimizer state_dict, tensors on the CPU
    rng: dict[str, torch.Tensor]
    noise_device: str
    meta: dict


# ---- file names ---------------------------------------------------------------------------------------------

def state_files(run_dir: Path, step: int) -> tuple[Path, Path]:
    folder = Path(run_dir) / STATE_DIR
    return folder / f"state-{step:06d}.safetensors", folder / f"state-{step:06d}.json"


def config_fingerprint(config, captions: Sequence[str] = ()) -> str:
    """The settings that shape the training math; ``captions``: a set's per-image captions (its order and its
    captions shape the steps too). A one-image run's fingerprint is what it was before sets and batches."""
    values = {name: getattr(config, name, None) for name in TRAINING_FIELDS}
    values.update({name: getattr(config, name) for name, default in LATER_FIELDS.items()
                   if getattr(config, name, default) != default})
    if len(captions) > 1:
        values["captions"] = list(captions)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def run_captions(run: RunFolder) -> list[str]:
    return [entry.get("caption", "") for entry in run.set_entries()]


def lora_named_parameters(transformer) -> list[tuple[str, torch.nn.Parameter]]:
    """The LoRA parameters in ``add_lora``'s order (the optimizer's order)."""
    return [(n, p) for n, p in transformer.named_parameters() if ".lora_" in n]


# ---- saving -------------------------------------------------------------------------------------------------

def snapshot_state(transformer, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                   mask_generator: torch.Generator, config,
                   captions: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """Copies (on the CPU) of everything a resume needs, as of now: training may go on while they are written."""
    named = lora_named_parameters(transformer)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in named:
        tensors[f"lora.{name}"] = param.detach().to("cpu", torch.float32).clone().contiguous()

    sd = optimizer.state_dict()
    plain_state: dict[str, dict] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu").clone().contiguous()
            else:
                plain_state.setdefault(str(index), {})[key] = value
    groups = json.loads(json.dumps(sd["param_groups"], default=_not_json))

    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    tensors["rng.noise"] = generator.get_state()
    tensors["rng.mask"] = mask_generator.get_state()
    meta = {
        "config_fingerprint": config_fingerprint(config, captions),
        "params": [[name, list(param.shape)] for name, param in named],
        "optimizer": {"class": type(optimizer).__name__, "param_groups": groups, "plain_state": plain_state},
        "noise_device": str(generator.device.type),
    }
    return tensors, meta


def write_state(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> int:
    """Serialise, hash and write a snapshot: the tensors file first, then the JSON that marks it complete."""
    import safetensors.torch

    data = safetensors.torch.save(tensors, metadata={"writer": WRITER, "format": str(STATE_FORMAT), "step": str(step)})
    tensor_path, json_path = state_files(run_dir, step)
    atomic_write_bytes(tensor_path, data)
    atomic_write_json(json_path, {
        "writer": WRITER,
        "format": STATE_FORMAT,
        "step": step,
        "tensors": tensor_path.name,
        "tensors_bytes": len(data),
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
        **meta,
        "torch": torch.__version__,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    return len(data)


class StateWriter:
    """Training states written on a background thread, one at a time and in order.

    ``save`` takes the snapshot at once (CPU copies: training may change the weights right after) and leaves
    serialising, hashing and the fsync'd writes — ~3-4 s per checkpoint for a rank-16 FLUX.1 LoRA on the benchmark
    machine, 10 checkpoints in a 500-step run — to overlap the next training steps. A state is complete or absent
    at any instant (tensors first, JSON commit mark last). A write's error is raised by the
    next ``save`` or by ``wait``, which the loop calls before it ends.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, run_dir: Path, step: int, transformer, optimizer, generator, mask_generator, config,
             captions: Sequence[str] = ()) -> None:
        self.wait()
        tensors, meta = snapshot_state(transformer, optimizer, generator, mask_generator, config, captions)
        self._thread = threading.Thread(target=self._write, args=(Path(run_dir), step, tensors, meta),
                                        name=f"state-writer-{step}", daemon=True)
        self._thread.start()

    def _write(self, run_dir: Path, step: int, tensors, meta) -> None:
        try:
            write_state(run_dir, step, tensors, meta)
        except BaseException as err:  # handed to the training thread by wait()
            self._error = err

    def close(self) -> None:
        """Wait for the last write without raising (the run is ending for another reason): its error is logged."""
        try:
            self.wait()
        except Exception:
            log.warning("writing the last training state failed", exc_info=True)

    def wait(self) -> None:
        """Block until the last state is on disk; raise its write error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _not_json(value):
    raise TypeError(f"optimizer setting of type {type(value).__name__} can't be saved as JSON")


# ---- loading ------------------------------------------------------------------------------------------------

def load_state(run: RunFolder, step: int) -> TrainingState:
    """Read and verify the state of ``step`` from the run's own folder. Raises ``DamagedState``."""
    tensor_path, json_path = state_files(run.path, step)
    meta = read_json(json_path, f"training state JSON of step {step}")
    if not isinstance(meta, dict) or meta.get("writer") != WRITER or meta.get("format") != STATE_FORMAT:
        raise DamagedState(f"'{json_path.name}' was not written by this app (or by an incompatible version).")
    if meta.get("step") != step or meta.get("tensors") != tensor_path.name:
        raise DamagedState(f"'{json_path.name}' does not describe step {step}.")
    if meta.get("config_fingerprint") != config_fingerprint(run.config, run_captions(run)):
        raise DamagedState(f"The training state of step {step} was saved with different settings than run.json "
                           "holds now; it can't continue this run.")
    if tensor_path.is_symlink() or not tensor_path.is_file():
        raise DamagedState(f"'{tensor_path.name}' is missing.")
    if tensor_path.stat().st_size != meta.get("tensors_bytes"):
        raise DamagedState(f"'{tensor_path.name}' has the wrong size (truncated?).")
    data = tensor_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("tensors_sha256"):
        raise DamagedState(f"'{tensor_path.name}' does not match its checksum (damaged).")
    try:
        tensors, _ = weights.load_safetensors_bytes(data, tensor_path.name, "training state")
    except UserError as err:
        raise DamagedState(str(err)) from None

    try:
        params = [(str(n), tuple(int(d) for d in shape)) for n, shape in meta["params"]]
        groups = meta["optimizer"]["param_groups"]
        plain_state = meta["optimizer"].get("plain_state", {})
    except (KeyError, TypeError, ValueError):
        raise DamagedState(f"'{json_path.name}' is incomplete.") from None
    names = [n for n, _ in params]
    lora = {}
    for name, shape in params:
        t = tensors.get(f"lora.{name}")
        if t is None or tuple(t.shape) != shape or t.dtype != torch.float32:
            raise DamagedState(f"The training state of step {step} lacks or mangles the LoRA weight {name}.")
        lora[name] = t
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, sub = key.split(".", 2)
            opt_state.setdefault(int(index), {})[sub] = value
    for index, entry in plain_state.items():
        opt_state.setdefault(int(index), {}).update(entry)
    if set(opt_state) - set(range(len(names))):
        raise DamagedState(f"The optimizer state of step {step} refers to parameters that don't exist.")
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    if not {"torch", "noise", "mask"} <= set(rng):
        raise DamagedState(f"The training state of step {step} lacks its random-number states.")
    expected = {f"lora.{n}" for n in names} | {k for k in tensors if k.startswith(("optimizer.", "rng."))}
    if set(tensors) != expected:
        raise DamagedState(f"The training state of step {step} holds unexpected tensors.")
    return TrainingState(step=step, param_names=names, lora=lora,
                         optimizer={"state": opt_state, "param_groups": groups}, rng=rng,
                         noise_device=str(meta.get("noise_device", "cpu")), meta=meta)


def apply_weights(state: TrainingState, transformer, optimizer: torch.optim.Optimizer) -> None:
    """Put the saved LoRA weights and optimizer state into a freshly set-up transformer and optimizer."""
    named = lora_named_parameters(transformer)
    if [n for n, _ in named] != state.param_names:
        raise UserError("The saved training state does not match this model's LoRA layers (different model or "
                        "rank?); the run can't be resumed.")
    with torch.no_grad():
        for name, param in named:
            saved = state.lora[name]
            if saved.shape != param.shape:
                raise UserError(f"The saved LoRA weight {name} has shape {tuple(saved.shape)}, the model expects "
                                f"{tuple(param.shape)}; the run can't be resumed.")
            param.copy_(saved.to(param.device, param.dtype))
    try:
        optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError) as err:
        raise UserError(f"The saved optimizer state does not fit ({err}); the run can't be resumed.") from None


def apply_rng(state: TrainingState, generator: torch.Generator, mask_generator: torch.Generator, seed: int) -> list[str]:
    """Restore every random-number stream. Returns warnings (e.g. resumed on another kind of device)."""
    warnings = []
    torch.set_rng_state(state.rng["torch"])
    mask_generator.set_state(state.rng["mask"])
    if state.noise_device == generator.device.type:
        generator.set_state(state.rng["noise"])
    else:
        generator.manual_seed(seed + state.step)
        warnings.append(f"The run was trained on {state.noise_device} and continues on {generator.device.type}: "
                        "its noise sequence can't be carried over, so the result will differ slightly from an "
                        "uninterrupted run.")
    cuda = sorted((k for k in state.rng if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([state.rng[k] for k in cuda])
    return warnings


def read_json(path: Path, what: str, error: UserError | None = None):
    """Bounded JSON of ours: a missing, oversized or unparsable file raises ``error`` (default ``DamagedState``)."""
    try:
        if path.is_symlink() or not path.is_file():
            raise error or DamagedState(f"The {what} is missing.")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise error or DamagedState(f"The {what} is too large to be ours.")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise (error or DamagedState(f"The {what} is damaged (not valid JSON).")) from None
