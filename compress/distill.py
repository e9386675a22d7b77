"""Knowledge distillation: train a student to match the teacher's next-token distributions.

Loss = T²·KL(teacher_T ‖ student_T) per token (Hinton et al. 2015), plus optionally
`hidden_weight`·MSE between student and teacher hidden states of mapped layers (a depth-
pruned student maps each kept layer to the teacher layer it was, from depth.json; any other
student maps its layers evenly), normalized by the teacher states' mean square.
The student is the step's input model (a pruned model, with the recipe's reference as
teacher) or a fresh model of a smaller config (`student = "config.json"`) that must share the
teacher's vocabulary. Training text: the calibration text by default, never the evaluation
text; windows shuffled with a fixed seed, until the token budget is spent.
accelerate runs the loop: one CPU process here, or one process per GPU under
`accelerate launch` / torchrun (DDP; FSDP is not wired up); the budget counts
tokens over all processes. A checkpoint (student weights, optimizer, scheduler, step) is
written atomically every `checkpoint_every` steps; an interrupted run resumes from it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from edgellm.errors import UserError

SEED = 0


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: int = Field(200_000, gt=0)  # training budget, tokens over all processes
    temperature: float = Field(2.0, gt=0)
    lr: float = Field(1e-4, gt=0)
    batch: int = Field(4, gt=0)  # sequences per step per process
    seqlen: int | None = Field(None, ge=16)  # default [calibration].seqlen
    hidden_weight: float = Field(0.0, ge=0)  # weight of the hidden-state MSE term
    text: str | None = None  # training text; default the [calibration] text
    student: str | None = None  # config.json (or HF folder) of a fresh, smaller student
    teacher: str | None = None  # HF folder; default the recipe's reference model
    checkpoint_every: int = Field(25, gt=0)  # steps between resumable checkpoints


def apply(source: Path, dest: Path, options: Options, context) -> None:
    from accelerate import Accelerator

    from edgellm.models import load_folder_model

    teacher_dir = Path(options.teacher) if options.teacher else context.teacher or Path(source)
    if not (teacher_dir / "config.json").is_file():
        raise UserError(f"teacher {teacher_dir} is not an HF model folder (no config.json): "
                        "give teacher= the folder of the original model")
    if options.student is None and teacher_dir.resolve() == Path(source).resolve():
        raise UserError("distill needs a student different from its teacher: put it after a "
                        "prune step in a recipe, or give student=CONFIG or teacher=FOLDER")
    teacher = load_folder_model(teacher_dir)
    student = fresh_student(options.student, teacher) if options.student else \
        load_folder_model(source)
    check_vocab(student, teacher, options.student or source)
    windows = training_windows(teacher_dir, options, context)
    # cpu=True when there is no GPU: accelerate then runs several processes (torchrun,
    # accelerate launch) as DDP over gloo instead of silently training each alone
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    layer_map = hidden_layer_map(source, student, teacher) if options.hidden_weight else None
    trained = train(student, teacher, windows, options, accelerator, context, layer_map)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from edgellm.compress.layerwise import copy_side_files

        copy_side_files(source if options.student is None else teacher_dir, dest)
        trained.save_pretrained(dest, safe_serialization=True)
        if context.resume and context.resume.exists():
            shutil.rmtree(context.resume)


def fresh_student(spec: str, teacher):
    """A randomly initialized model of the config in `spec` (a config.json or HF folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec)
    if not (path.is_dir() and (path / "config.json").is_file()) and \
            not (path.is_file() and path.name == "config.json"):
        raise UserError(f"student {path} is not a config.json or a folder holding one: "
                        "give the smaller model's config.json")
    try:
        config = AutoConfig.from_pretrained(path if path.is_dir() else path.parent,
                                            local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"student config {path} cannot be read ({exc}): fix the file") from None
    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def check_vocab(student, teacher, where) -> None:
    ours, theirs = student.config.vocab_size, teacher.config.vocab_size
    if ours != theirs:
        raise UserError(f"student {where} has vocab_size {ours}, the teacher's tokenizer {theirs}: "
                        "the student must use the teacher's tokenizer")


def training_windows(teacher_dir: Path, options: Options, context) -> torch.Tensor:
    """Every non-overlapping window of the training text, [windows, seqlen]."""
    from transformers import AutoTokenizer

    from edgellm.data import read_text, resolve_text, tokenize

    cal = context.calibration
    seqlen = options.seqlen or cal.seqlen
    path = resolve_text(options.text or cal.text)
    body, _ = read_text(path)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
    ids = torch.from_numpy(tokenize(tokenizer, body, None).astype("int64"))
    count = len(ids) // seqlen
    if count < options.batch:
        raise UserError(f"training text {path} has {len(ids)} tokens, fewer than one batch of "
                        f"{options.batch} × {seqlen}: use a longer text or a smaller batch/seqlen")
    return ids[:count * seqlen].reshape(count, seqlen)


def hidden_layer_map(source: Path, student, teacher) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs whose outputs the MSE term ties together."""
    from edgellm.compress.depth import RECORD

    record = Path(source) / RECORD
    ours, theirs = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    if record.is_file():
        kept = json.loads(record.read_text())["kept"]
        return list(enumerate(kept))
    return [(i, round((i + 1) * theirs / ours) - 1) for i in range(ours)]


def distill_loss(student_out, teacher_out, temperature: float, hidden_weight: float,
                 layer_map) -> torch.Tensor:
    t = temperature
    log_student = torch.log_softmax(student_out.logits.float() / t, dim=-1)
    log_teacher = torch.log_softmax(teacher_out.logits.float() / t, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean() * t * t
    if not layer_map:
        return kl
    mse = 0.0
    for ours, theirs in layer_map:  # hidden_states[0] is the embedding output
        target = teacher_out.hidden_states[theirs + 1]
        diff = student_out.hidden_states[ours + 1] - target
        mse = mse + diff.pow(2).mean() / target.pow(2).mean().clamp(min=1e-6)
    return kl + hidden_weight * mse / len(layer_map)


def train(student, teacher, windows, options: Options, accelerator, context, layer_map):
    from rich.progress import Progress
    from transformers import get_cosine_schedule_with_warmup

    seqlen = windows.shape[1]
    tokens_per_step = options.batch * seqlen * accelerator.num_processes
    total_steps = max(1, math.ceil(options.tokens / tokens_per_step))
    optimizer = torch.optim.AdamW(student.parameters(), lr=options.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, total_steps // 20), total_steps)
    start = load_checkpoint(context.resume, student, optimizer, scheduler)
    student.train()
    teacher.eval().requires_grad_(False)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher.to(accelerator.device)
    hidden = layer_map is not None
    with Progress(console=context.console, transient=True,
                  disable=not accelerator.is_main_process) as progress:
        task = progress.add_task("distill", total=total_steps, completed=start)
        began, done = time.perf_counter(), 0
        for step in range(start, total_steps):
            batch = step_batch(windows, step, options.batch, accelerator).to(accelerator.device)
            with torch.no_grad():
                teacher_out = teacher(input_ids=batch, output_hidden_states=hidden, use_cache=False)
            student_out = student(input_ids=batch, output_hidden_states=hidden, use_cache=False)
            loss = distill_loss(student_out, teacher_out, options.temperature,
                                options.hidden_weight, layer_map)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            done += tokens_per_step
            rate = done / (time.perf_counter() - began)
            progress.update(task, advance=1, description=f"distill loss {loss.item():.3f} "
                                                         f"{rate:,.0f} tok/s")
            if (step + 1) % options.checkpoint_every == 0 and step + 1 < total_steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(context.resume, accelerator.unwrap_model(student), optimizer,
                                    scheduler, step + 1)
    if context.console and accelerator.is_main_process and start < total_steps:
        context.console.print(f"distill: {total_steps} steps, {total_steps * tokens_per_step:,} "
                              f"tokens, final loss {loss.item():.3f}")
    return accelerator.unwrap_model(student).eval()


def step_batch(windows: torch.Tensor, step: int, batch: int, accelerator) -> torch.Tensor:
    """The windows of one step for this process: a fixed-seed shuffle per pass over the
    text, so a resumed run sees the same batches as an uninterrupted one."""
    per_step = batch * accelerator.num_processes
    first = step * per_step
    epoch, offset = divmod(first, len(windows))
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(SEED + epoch))
    order = torch.cat([order, order])  # a step that runs past the end wraps around
    mine = order[offset + accelerator.process_index * batch:][:batch]
    return windows[mine]


def save_checkpoint(resume: Path | None, student, optimizer, scheduler, step: int) -> None:
    """Write ckpt-<step>/ fully, then point latest.json at it, then drop older ones."""
    if resume is None:
        return
    from safetensors.torch import save_file

    from edgellm.artifacts import write_json_atomic

    folder = resume / f"ckpt-{step:08d}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    save_file(_untied(state), str(folder / "student.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               folder / "optimizer.pt")
    write_json_atomic(resume / "latest.json", {"step": step, "folder": folder.name})
    for old in resume.glob("ckpt-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(resume: Path | None, student, optimizer, scheduler) -> int:
    """Restore the latest checkpoint, if any; returns the step to continue from."""
    from safetensors.torch import load_file

    from edgellm.artifacts import read_json

    latest = read_json(resume / "latest.json") if resume else None
    if not latest:
        return 0
    folder = resume / latest["folder"]
    missing, unexpected = student.load_state_dict(load_file(folder / "student.safetensors"),
                                                  strict=False)
    tied = {"lm_head.weight"} if student.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise UserError(f"checkpoint {folder} does not fit the student: delete {resume} to start over")
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return int(latest["step"])


def _untied(state: dict) -> dict:
    """safetensors refuses shared storage: keep one copy of tied weights (reloaded tied)."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = tensor.data_ptr()
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out
