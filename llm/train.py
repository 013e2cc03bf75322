"""The training loop: Muon or AdamW, warmup + cosine schedule, accumulation, DDP, checkpoints, exact resume.

Everything a step computes is a function of (params, inputs, step): the data
order (llm.train_data), the learning rate (`lr_at`) and the dropout RNG, whose
state is saved in each checkpoint (llm.checkpoint.TrainingCheckpoint). So on CPU
a run killed at any step and re-run ends with weights bit-identical to an
uninterrupted run. Where a run starts (checkpoints/last.pt, train.resume or
scratch) is decided by llm.resume. Ctrl-C (SIGINT) or SIGTERM stops the run
after its current step, with checkpoints/last.pt written.

Under `torchrun` every rank runs this loop (DDP, gloo on CPU, nccl on CUDA);
only rank 0 writes files or prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from llm.checkpoint import TrainingCheckpoint, model_state, save_model_file
from llm.config import Params, TrainConfig, section_dict
from llm.errors import CheckpointError, Interrupted, LLMError
from llm.fingerprint import code_hashes, make_fingerprint
from llm.hardware import autocast, mfu, resolve_device, resolve_precision, set_threads
from llm.io import check_outputs, write_json_atomic
from llm.memory import check_training_fits
from llm.model import GPT
from llm.optim import make_optimizer
from llm.resume import Start, load_state, plan_start
from llm.train_data import TrainData
from llm.trainlog import TRAIN_LOG, VAL_LOG, TrainLog

LAST = "last.pt"
BEST = "best_model.pt"
# Metrics that measure the machine, not the model: kept out of models/model.pt so that identical runs
# write identical bytes (DVC caches the file by its hash).
TIMING_METRICS = ("tokens_per_sec", "train_time_s", "mfu")


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based optimizer step `step`: linear warmup to the peak, cosine down to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    decay_steps = total_steps - 1 - cfg.warmup_steps
    progress = 1.0 if decay_steps <= 0 else min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (cfg.learning_rate - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in the (possibly single-process) job."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _start_distributed(device: torch.device) -> tuple[Ranks, bool]:
    """Join the torchrun process group if WORLD_SIZE > 1; returns (ranks, whether we created the group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), False
    created = not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), created


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch RNG states (the dropout masks depend on them)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@torch.no_grad()
def validate(model: torch.nn.Module, data: TrainData, device: torch.device,
             precision: str) -> tuple[float, float]:
    """Validation loss (nats/token) and bits per byte over the fixed validation batches, all ranks summed."""
    model.eval()
    totals = torch.zeros(2, device=device)
    for x, y in data.validation_batches():
        with autocast(precision, device):
            loss = model(x.to(device), y.to(device))
        totals[0] += loss.float() * y.numel()
        totals[1] += y.numel()
    model.train()
    if data.world > 1:
        dist.all_reduce(totals)
    nats, count = totals.tolist()
    return nats / count, data.val_tokens.bits_per_byte(nats / count)


class StopSignals:
    """SIGINT and SIGTERM ask the run to stop after its current step; a second one of the same kind stops
    it at once (the usual KeyboardInterrupt or termination). Handlers are installed only in the main
    thread, the one thread Python delivers signals to."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Throughput:
    """Tokens per second over the steps since the last log row, and over this session.

    A session's first step (allocation, torch.compile) is left out of the session rate.
    """

    def __init__(self, tokens_per_step: int, first_step: int) -> None:
        self.tokens_per_step, self.first_step = tokens_per_step, first_step
        self.window_time = self.session_time = 0.0
        self.window_steps = self.session_steps = 0

    def add(self, step: int, elapsed: float) -> None:
        """Count optimizer step `step` (1-based), which took `elapsed` seconds."""
        self.window_time, self.window_steps = self.window_time + elapsed, self.window_steps + 1
        if step > self.first_step:
            self.session_time, self.session_steps = self.session_time + elapsed, self.session_steps + 1

    def window_rate(self) -> float:
        return self.tokens_per_step * self.window_steps / self.window_time

    def reset_window(self) -> None:
        self.window_time, self.window_steps = 0.0, 0

    def session_rate(self) -> float | None:
        return self.tokens_per_step * self.session_steps / self.session_time if self.session_steps else None


class Trainer:
    """One training run: builds the model and data, starts where llm.resume says, trains, writes outputs."""

    def __init__(self, params: Params, device: torch.device, ranks: Ranks, *, shards_dir: Path,
                 tokenizer_path: Path, checkpoint_dir: Path, model_path: Path, metrics_dir: Path) -> None:
        self.params, self.cfg, self.device, self.ranks = params, params.train, device, ranks
        self.checkpoint_dir, self.model_path, self.metrics_dir = checkpoint_dir, model_path, metrics_dir
        self.precision = resolve_precision(params.runtime.precision, device, params.model.d_model)
        self.data = TrainData(params, shards_dir, tokenizer_path, ranks.rank, ranks.world)
        self.model_config, self.total_steps = self.data.model_config, self.data.total_steps
        self.fingerprint = make_fingerprint(self.model_config, self.cfg, self.data.shards_sha256,
                                            self.data.tokenizer_sha256, code_hashes())
        check_training_fits(self.model_config, self.cfg, device, ranks.world, self.precision)
        torch.manual_seed(self.cfg.seed)  # same initial weights on every rank and every run
        self.raw_model = GPT(self.model_config).to(self.device)
        set_threads(params.runtime.threads, self.raw_model, self.device,
                    rows=self.data.micro_batch * self.data.seq_len)
        self.optimizer = make_optimizer(self.raw_model, self.cfg.learning_rate, self.cfg.weight_decay,
                                        (self.cfg.beta1, self.cfg.beta2), self.device,
                                        optimizer=self.cfg.optimizer, muon_lr=self.cfg.muon_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step, self.best_val_loss, self.train_time_s = 0, math.inf, 0.0
        self.latest: dict[str, float] = {}
        self.log = TrainLog()
        self.saved_step: int | None = None
        self.stop = StopSignals()
        self._restore(plan_start(self.checkpoint_dir / LAST, self.cfg, self.fingerprint, self.model_config,
                                 self.total_steps))
        self._check_ranks_agree()
        self.eval_model = torch.compile(self.raw_model) if params.runtime.compile else self.raw_model
        self.model: torch.nn.Module = self.eval_model
        if self.ranks.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.eval_model, device_ids=device_ids)

    # ----- start -----

    def _restore(self, start: Start) -> None:
        """Load what `start` says and print why; restore the position and RNG, or seed dropout afresh."""
        for line in start.lines:
            self._say(line)
        load_state(start, self.raw_model, self.optimizer, self.scaler)
        checkpoint = start.checkpoint
        if checkpoint is None or not start.position:
            self._seed_dropout()
            return
        self.step, self.saved_step = checkpoint.step, checkpoint.step
        self.best_val_loss = float(checkpoint.progress.get("best_val_loss", math.inf))
        self.train_time_s = float(checkpoint.progress.get("train_time_s", 0.0))
        self.latest = dict(checkpoint.progress.get("latest", {}))
        self.log = TrainLog.from_state(checkpoint.log, self.step)
        if len(checkpoint.rng) != self.ranks.world:
            self._say(f"the checkpoint was written by {len(checkpoint.rng)} processes, this run has "
                      f"{self.ranks.world}: dropout draws new random numbers from here on")
            self._seed_dropout()
            return
        mine = checkpoint.rng[self.ranks.rank]
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.device)

    def _check_ranks_agree(self) -> None:
        """Every rank must start at the same step (multi-node: each node reads its own checkpoints/)."""
        if self.ranks.world == 1:
            return
        steps = torch.tensor([self.step, -self.step], device=self.device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            raise CheckpointError(f"{self.checkpoint_dir}: the processes would start at different steps "
                                  f"({-int(steps[1])} to {int(steps[0])}); put checkpoints/ on storage "
                                  "shared by every node, or delete it everywhere to start fresh")

    def _seed_dropout(self) -> None:
        """Seed the dropout RNG from (seed, rank, step): its own stream per rank."""
        entropy = [self.cfg.seed, self.ranks.rank, self.step]
        torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    # ----- training -----

    def _train_step(self) -> tuple[float, bool]:
        """One optimizer step over the global batch; returns its mean loss over all ranks and whether
        any rank was asked to stop (so that all ranks stop after the same step)."""
        cfg = self.cfg
        totals = torch.zeros(3, device=self.device)  # nats summed, tokens counted, ranks asked to stop
        for micro, (x, y) in enumerate(self.data.micro_batches(self.step)):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            syncs = self.ranks.world == 1 or micro == cfg.grad_accum_steps - 1
            with contextlib.nullcontext() if syncs else self.model.no_sync():
                with autocast(self.precision, self.device):
                    loss = self.model(x, y)
                self.scaler.scale(loss / cfg.grad_accum_steps).backward()
            totals[0] += loss.detach().float() * y.numel()
            totals[1] += y.numel()
        totals[2] = float(self.stop.received is not None)
        if self.ranks.world > 1:
            dist.all_reduce(totals)
        nats, count, stops = totals.tolist()
        mean_loss = nats / count
        if not math.isfinite(mean_loss):
            kept = "no checkpoint was written" if self.saved_step is None else \
                f"{self.checkpoint_dir / LAST} (step {self.saved_step}) is kept"
            raise LLMError(f"loss became {mean_loss} at step {self.step + 1}; lower train.learning_rate, "
                           f"set train.grad_clip (e.g. 1.0) or use runtime.precision fp32/bf16; {kept}")
        scale = lr_at(self.step, self.total_steps, cfg) / cfg.learning_rate  # every group follows one shape
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * scale
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # One process stops on its own signal, even one that came during the update; ranks stop together.
        return mean_loss, self.stop.received is not None if self.ranks.world == 1 else stops > 0

    def _evaluate(self) -> None:
        """Validate, log it, and keep best_model.pt on a new best validation loss."""
        val_loss, val_bpb = validate(self.eval_model, self.data, self.device, self.precision)
        self.latest.update(val_loss=val_loss, val_bpb=val_bpb)
        self.log.add_val_row(self.step, val_loss, val_bpb)
        self._say(f"step {self.step}: val_loss {val_loss:.4f}, val_bpb {val_bpb:.4f}")
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self._save(self.checkpoint_dir / BEST)

    def _save(self, path: Path) -> None:
        """Write a training checkpoint (rank 0; every rank contributes its RNG state)."""
        rng = [_rng_state(self.device)]
        if self.ranks.world > 1:
            rng = [None] * self.ranks.world
            dist.all_gather_object(rng, _rng_state(self.device))
        if not self.ranks.main:
            return
        epoch, position = divmod(self.step, self.data.steps_per_epoch)
        TrainingCheckpoint(
            model=model_state(self.raw_model), model_config=dataclasses.asdict(self.model_config),
            tokenizer_sha256=self.data.tokenizer_sha256, step=self.step, epoch=epoch, position=position,
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else {},
            rng=[{k: v.cpu() for k, v in state.items()} for state in rng],
            fingerprint=self.fingerprint.to_dict(), origin=self.cfg.resume,
            progress={"best_val_loss": self.best_val_loss, "train_time_s": self.train_time_s,
                      "latest": self.latest},
            log=self.log.state(),
        ).save(path)
        if path.name == LAST:
            self.saved_step = self.step
            self.log.write(self.metrics_dir)

    def _say(self, message: str) -> None:
        if self.ranks.main:
            tqdm.write(message)

    def run(self) -> dict[str, Any]:
        """Train to the last step, evaluating and checkpointing on schedule; returns the metrics.

        SIGINT or SIGTERM stops the run after the current step with checkpoints/last.pt written, so the
        next run continues from that step (raises Interrupted)."""
        runtime, cfg = self.params.runtime, self.cfg
        tokens_per_step = cfg.batch_size * self.data.seq_len
        self._say(f"training {self.raw_model.num_params():,} parameters on {self.device.type} x "
                  f"{self.ranks.world} ({self.precision}): {self.total_steps} steps "
                  f"({self.data.steps_per_epoch} per epoch), {tokens_per_step:,} tokens per step")
        speed = Throughput(tokens_per_step, first_step=self.step + 1)
        with self.stop, tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                             dynamic_ncols=True, disable=not (runtime.progress and self.ranks.main)) as bar:
            while self.step < self.total_steps:
                started = time.perf_counter()
                loss, stop = self._train_step()
                elapsed = time.perf_counter() - started
                self.step += 1
                self.train_time_s += elapsed
                speed.add(self.step, elapsed)
                self.log.add_loss(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{speed.window_rate():,.0f}", refresh=False)
                last_step = self.step == self.total_steps
                if self.step % runtime.log_interval == 0 or last_step:
                    self._log_row(speed.window_rate())
                    speed.reset_window()
                if self.step % cfg.eval_interval == 0 or last_step:
                    self._evaluate()
                if self.step % cfg.checkpoint_interval == 0 or last_step or stop:
                    self._save(self.checkpoint_dir / LAST)
                if stop and not last_step:
                    raise Interrupted(self._interrupted_message(), self.stop.received or signal.SIGTERM)
        if speed.session_rate() is not None:
            self.latest["tokens_per_sec"] = speed.session_rate()
        return self._finish()

    def _log_row(self, rate: float) -> None:
        """Append a train_log row (mean loss since the last row) and print it."""
        lr = lr_at(self.step - 1, self.total_steps, self.cfg)
        mean_loss = self.log.add_train_row(self.step, lr, rate)
        self.latest.update(train_loss=mean_loss, tokens_per_sec=rate)
        epoch = (self.step - 1) // self.data.steps_per_epoch
        self._say(f"step {self.step}/{self.total_steps} | epoch {epoch} | loss {mean_loss:.4f} "
                  f"| lr {lr:.3e} | {rate:,.0f} tok/s")

    def _interrupted_message(self) -> str:
        """The one line a stopped run ends with."""
        name = signal.Signals(self.stop.received).name if self.stop.received else "a signal to another rank"
        return (f"interrupted by {name} after step {self.step}/{self.total_steps}: "
                f"{self.checkpoint_dir / LAST} holds it; run the train stage again to continue from there")

    def _finish(self) -> dict[str, Any]:
        """Write models/model.pt, metrics/train.json and the curves (rank 0); return the metrics."""
        latest = self.latest
        metrics: dict[str, Any] = {
            "train_loss": latest.get("train_loss"), "val_loss": latest.get("val_loss"),
            "val_ppl": math.exp(latest["val_loss"]) if "val_loss" in latest else None,
            "val_bpb": latest.get("val_bpb"), "tokens_per_sec": latest.get("tokens_per_sec"),
            "num_params": self.raw_model.num_params(), "train_time_s": round(self.train_time_s, 3),
            "device": self.device.type, "steps": self.step,
            "epochs": round(self.step / self.data.steps_per_epoch, 4),
        }
        if metrics["tokens_per_sec"] is not None:
            utilisation = mfu(metrics["tokens_per_sec"] / self.ranks.world, self.raw_model.flops_per_token(),
                              self.device, self.precision)
            if utilisation is not None:
                metrics["mfu"] = utilisation
        if self.ranks.main:
            run_params = {"model": section_dict(self.params.model), "train": section_dict(self.params.train)}
            model_metrics = {k: v for k, v in metrics.items() if k not in TIMING_METRICS}
            extra = {"step": self.step, "metrics": model_metrics, "params": run_params}
            try:
                save_model_file(self.model_path, self.raw_model, self.model_config,
                                self.data.tokenizer_sha256, extra)
            except (OSError, RuntimeError) as exc:
                raise CheckpointError(f"{self.model_path}: could not write the model ({exc})") from None
            write_json_atomic(self.metrics_dir / "train.json", metrics)
            self.log.write(self.metrics_dir)
        return metrics


def train(params: Params, *, shards_dir: str | os.PathLike = "data/shards",
          tokenizer_path: str | os.PathLike = "data/tokenizer.json",
          checkpoint_dir: str | os.PathLike = "checkpoints",
          model_path: str | os.PathLike = "models/model.pt",
          metrics_dir: str | os.PathLike = "metrics") -> dict[str, Any]:
    """Train the GPT described by `params` on the token shards; returns the metrics of metrics/train.json."""
    device = resolve_device(params.runtime.device)
    ranks, joined = _start_distributed(device)
    try:
        if ranks.main:  # before any work: every output can be written; what killed runs left is removed
            metrics, checkpoints = Path(metrics_dir), Path(checkpoint_dir)
            check_outputs(model_path, metrics / "train.json", metrics / TRAIN_LOG, metrics / VAL_LOG,
                          checkpoints / LAST, checkpoints / BEST)
        trainer = Trainer(params, device, ranks, shards_dir=Path(shards_dir),
                          tokenizer_path=Path(tokenizer_path), checkpoint_dir=Path(checkpoint_dir),
                          model_path=Path(model_path), metrics_dir=Path(metrics_dir))
        return trainer.run()
    finally:
        if joined:
            dist.destroy_process_group()
