"""The training loop: Muon or AdamW, warmup + cosine schedule, accumulation, DDP, checkpoints, exact resume.

Everything a step computes is a function of (params, inputs, step): the data
order (WindowSampler), the learning rate (`lr_at`) and the dropout RNG, whose
state is saved in each checkpoint. So on CPU a run killed at any step and
re-run ends with weights bit-identical to an uninterrupted run.

Under `torchrun` every rank runs this loop (DDP, gloo on CPU, nccl on CUDA);
rank r takes the r-th contiguous slice of each global batch, and only rank 0
writes files or prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from llm.checkpoint import MODEL_FORMAT_VERSION, read_checkpoint, save_model_file, save_training_checkpoint
from llm.config import Params, TrainConfig, section_dict
from llm.errors import CheckpointError, ConfigError, DataError, LLMError
from llm.fingerprint import Fingerprint, describe_changes, dict_changes, make_fingerprint
from llm.hardware import autocast, mfu, resolve_device, resolve_precision
from llm.io import sha256_file, write_json_atomic
from llm.model import GPT
from llm.optim import make_optimizer
from llm.shards import TokenShards, WindowSampler, get_batch, read_meta
from llm.trainlog import TrainLog

LAST = "last.pt"
BEST = "best_model.pt"


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based optimizer step `step`: linear warmup to the peak, cosine down to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    decay_steps = total_steps - 1 - cfg.warmup_steps
    progress = 1.0 if decay_steps <= 0 else min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (cfg.learning_rate - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """max_epochs passes over the windows, capped by max_steps when it is set."""
    steps = cfg.max_epochs * steps_per_epoch
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


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


def _check_writable(folder: Path) -> None:
    """Fail before training, not after hours, when an output folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise CheckpointError(f"{folder}: cannot write there ({type(exc).__name__}: {exc}); "
                              "make it a writable folder") from None


class Trainer:
    """One training run: builds the model and data, resumes if it can, trains, writes outputs."""

    def __init__(self, params: Params, device: torch.device, ranks: Ranks, *, shards_dir: Path,
                 tokenizer_path: Path, checkpoint_dir: Path, model_path: Path, metrics_dir: Path) -> None:
        self.params, self.cfg, self.device, self.ranks = params, params.train, device, ranks
        self.shards_dir, self.checkpoint_dir = shards_dir, checkpoint_dir
        self.model_path, self.metrics_dir = model_path, metrics_dir
        self.precision = resolve_precision(params.runtime.precision, device)
        self._setup_data(tokenizer_path)
        torch.manual_seed(self.cfg.seed)  # same initial weights on every rank and every run
        self.raw_model = GPT(self.model_config).to(self.device)
        self.optimizer = make_optimizer(self.raw_model, self.cfg.learning_rate, self.cfg.weight_decay,
                                        (self.cfg.beta1, self.cfg.beta2), self.device,
                                        optimizer=self.cfg.optimizer, muon_lr=self.cfg.muon_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step, self.best_val_loss, self.train_time_s = 0, math.inf, 0.0
        self.latest: dict[str, float] = {}
        self.log = TrainLog()
        self.saved_step: int | None = None
        if not self._resume():
            self._seed_dropout()
        self._check_ranks_agree()
        self.eval_model = torch.compile(self.raw_model) if params.runtime.compile else self.raw_model
        self.model: torch.nn.Module = self.eval_model
        if self.ranks.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.eval_model, device_ids=device_ids)

    # ----- setup -----

    def _setup_data(self, tokenizer_path: Path) -> None:
        """Token shards, batch layout, window order, step count and the run's fingerprint."""
        cfg, world = self.cfg, self.ranks.world
        meta = read_meta(self.shards_dir)
        if not tokenizer_path.is_file():
            raise DataError(f"{tokenizer_path}: not found; run `dvc repro fit_tokenizer`")
        self.tokenizer_sha256 = sha256_file(tokenizer_path)
        if meta.get("tokenizer_sha256") != self.tokenizer_sha256:
            raise DataError(f"{self.shards_dir}: encoded with another tokenizer than {tokenizer_path}; "
                            "run `dvc repro encode`")
        self.model_config = dataclasses.replace(self.params.model, vocab_size=int(meta["vocab_size"]))
        self.seq_len = self.model_config.max_seq_length
        if cfg.batch_size % (world * cfg.grad_accum_steps):
            raise ConfigError(f"train.batch_size = {cfg.batch_size}: must be a multiple of "
                              f"train.grad_accum_steps ({cfg.grad_accum_steps}) x processes ({world}, "
                              "runtime.nproc_per_node)")
        self.rank_batch = cfg.batch_size // world
        self.micro_batch = self.rank_batch // cfg.grad_accum_steps
        self.train_tokens = TokenShards(self.shards_dir, "train")
        self.val_tokens = TokenShards(self.shards_dir, "valid")
        self.sampler = WindowSampler(len(self.train_tokens), self.seq_len, cfg.batch_size, cfg.seed)
        self.total_steps = total_steps(cfg, self.sampler.steps_per_epoch)
        self.val_batches = self._validation_batches()
        shards_sha256 = sha256_file(self.shards_dir / "meta.json")
        self.fingerprint = make_fingerprint(self.model_config, cfg, shards_sha256, self.tokenizer_sha256)

    def _validation_batches(self) -> list[np.ndarray]:
        """Fixed batches of non-overlapping validation windows (the first eval_batches, if set)."""
        num_windows = (len(self.val_tokens) - 1) // self.seq_len
        if num_windows == 0:
            raise DataError(f"{self.shards_dir}: the valid split has {len(self.val_tokens)} tokens, fewer "
                            f"than model.max_seq_length + 1 ({self.seq_len + 1}); use a shorter context")
        starts = np.arange(num_windows, dtype=np.int64) * self.seq_len
        size = self.cfg.batch_size // self.cfg.grad_accum_steps
        batches = [starts[i:i + size] for i in range(0, num_windows, size)]
        return batches[:self.cfg.eval_batches] if self.cfg.eval_batches else batches

    # ----- resume -----

    def _resume(self) -> bool:
        """Continue last.pt if it is this run's, else start from train.resume if set; True if RNG restored."""
        last, explicit = self.checkpoint_dir / LAST, self.cfg.resume
        if last.is_file():
            try:
                payload = read_checkpoint(last)
            except CheckpointError as exc:
                self._say(f"not resuming: {exc}; starting {'from train.resume' if explicit else 'fresh'}")
            else:
                changes = describe_changes(Fingerprint.from_dict(payload.get("fingerprint_parts", {})),
                                           self.fingerprint)
                origin = payload.get("origin", "")
                if origin != explicit:
                    changes.append(f"it continues a run started from {origin or 'scratch'} but "
                                   f"train.resume is {explicit!r}")
                if not changes:
                    self._load(payload, optimizer=True, position=True)
                    self.saved_step = self.step
                    self._say(f"resuming from {last} at step {self.step}/{self.total_steps} "
                              "(its fingerprint matches params.yaml, the shards and the tokenizer)")
                    return True
                then = f"starting from train.resume ({explicit})" if explicit else "starting fresh"
                self._say(f"not resuming from {last}: {'; '.join(changes)}; {then}")
        return self._resume_explicit(Path(explicit)) if explicit else False

    def _resume_explicit(self, path: Path) -> bool:
        """Start from train.resume: weights always, optimizer and position when compatible."""
        payload = read_checkpoint(path)
        model_changes = dict_changes("model", payload["model_config"], dataclasses.asdict(self.model_config))
        if model_changes:
            raise CheckpointError(f"train.resume = {path}: its model differs from params.yaml "
                                  f"({'; '.join(model_changes)}); match the model params or clear "
                                  "train.resume")
        if "optimizer" not in payload:
            self._load(payload, optimizer=False, position=False)
            self._say(f"train.resume: loaded model weights from {path} (it holds no optimizer state); "
                      "starting at step 0")
            return False
        old = Fingerprint.from_dict(payload.get("fingerprint_parts", {}))
        old_optimizer = old.train.get("optimizer", "adamw")  # the only optimizer before train.optimizer
        if old_optimizer != self.cfg.optimizer:
            self._load(payload, optimizer=False, position=False)
            self._say(f"train.resume: loaded model weights from {path}; its optimizer state is "
                      f"{old_optimizer}'s and train.optimizer is {self.cfg.optimizer}, so the optimizer "
                      "starts fresh at step 0")
            return False
        step = int(payload.get("step", 0))
        same_order = (old.shards_sha256 == self.fingerprint.shards_sha256
                      and old.train.get("batch_size") == self.cfg.batch_size
                      and old.train.get("seed") == self.cfg.seed)
        position = same_order and step < self.total_steps
        self._load(payload, optimizer=True, position=position)
        changes = describe_changes(old, self.fingerprint)
        if position:
            loaded = f"model weights, optimizer state, step {step} and RNG state"
        else:
            why = f"step {step} is already the last" if same_order else "the data order differs"
            loaded = f"model weights and optimizer state; starting at step 0 because {why}"
        note = "; ".join(changes) if changes else "same params: this continues that run exactly"
        self._say(f"train.resume: loaded {loaded} from {path} ({note})")
        return position

    def _load(self, payload: dict[str, Any], *, optimizer: bool, position: bool) -> None:
        """Restore weights, and optionally optimizer/scaler and the run's position, logs and RNG.

        The caller re-seeds the RNG when `position` is false."""
        try:
            self.raw_model.load_state_dict(payload["model"])
        except RuntimeError as exc:
            raise CheckpointError("checkpoint weights do not fit the model: "
                                  f"{str(exc).splitlines()[0]}") from None
        if optimizer:
            current = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            try:
                self.optimizer.load_state_dict(payload["optimizer"])
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"checkpoint optimizer state does not fit the model: {exc}") from None
            for group, settings in zip(self.optimizer.param_groups, current):
                group.update(settings)  # this run's weight decay, betas and kernels, not the stored ones
            if self.scaler.is_enabled() and payload.get("scaler"):
                self.scaler.load_state_dict(payload["scaler"])
        if not position:
            return
        self.step = int(payload["step"])
        state = payload.get("state", {})
        self.best_val_loss = float(state.get("best_val_loss", math.inf))
        self.train_time_s = float(state.get("train_time_s", 0.0))
        self.latest = dict(state.get("latest", {}))
        self.log = TrainLog.from_state(payload.get("log", {}), self.step)
        per_rank = payload.get("rng", [])
        if len(per_rank) != self.ranks.world:
            self._say(f"the checkpoint was written by {len(per_rank)} processes, this run has "
                      f"{self.ranks.world}: dropout draws new random numbers from here on")
            self._seed_dropout()
            return
        mine = per_rank[self.ranks.rank]
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

    def _train_step(self) -> float:
        """One optimizer step over the global batch; returns its mean loss over all ranks."""
        cfg = self.cfg
        epoch, position = divmod(self.step, self.sampler.steps_per_epoch)
        starts = self.sampler.starts(epoch, position)
        mine = starts[self.ranks.rank * self.rank_batch:(self.ranks.rank + 1) * self.rank_batch]
        totals = torch.zeros(2, device=self.device)  # nats summed, tokens counted
        for micro in range(cfg.grad_accum_steps):
            x, y = get_batch(self.train_tokens, mine[micro * self.micro_batch:(micro + 1) * self.micro_batch],
                             self.seq_len)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            syncs = self.ranks.world == 1 or micro == cfg.grad_accum_steps - 1
            with contextlib.nullcontext() if syncs else self.model.no_sync():
                with autocast(self.precision, self.device):
                    loss = self.model(x, y)
                self.scaler.scale(loss / cfg.grad_accum_steps).backward()
            totals[0] += loss.detach().float() * y.numel()
            totals[1] += y.numel()
        if self.ranks.world > 1:
            dist.all_reduce(totals)
        nats, count = totals.tolist()
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
        return mean_loss

    @torch.no_grad()
    def _validate(self) -> tuple[float, float]:
        """Validation loss (nats/token) and bits per byte over the fixed validation batches."""
        self.eval_model.eval()
        totals = torch.zeros(2, device=self.device)
        for starts in self.val_batches[self.ranks.rank::self.ranks.world]:
            x, y = get_batch(self.val_tokens, starts, self.seq_len)
            with autocast(self.precision, self.device):
                loss = self.eval_model(x.to(self.device), y.to(self.device))
            totals[0] += loss.float() * y.numel()
            totals[1] += y.numel()
        self.eval_model.train()
        if self.ranks.world > 1:
            dist.all_reduce(totals)
        nats, count = totals.tolist()
        return nats / count, self.val_tokens.bits_per_byte(nats / count)

    def _evaluate(self) -> None:
        """Validate, log it, and keep best_model.pt on a new best validation loss."""
        val_loss, val_bpb = self._validate()
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
        epoch, position = divmod(self.step, self.sampler.steps_per_epoch)
        save_training_checkpoint(path, {
            "format_version": MODEL_FORMAT_VERSION,
            "model": {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()},
            "model_config": dataclasses.asdict(self.model_config),
            "tokenizer_sha256": self.tokenizer_sha256,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "step": self.step, "epoch": epoch, "position": position,
            "rng": [{k: v.cpu() for k, v in state.items()} for state in rng],
            "fingerprint": self.fingerprint.digest, "fingerprint_parts": self.fingerprint.to_dict(),
            "origin": self.cfg.resume,
            "state": {"best_val_loss": self.best_val_loss, "train_time_s": self.train_time_s,
                      "latest": self.latest},
            "log": self.log.state(),
        })
        if path.name == LAST:
            self.saved_step = self.step
            self.log.write(self.metrics_dir)

    def _say(self, message: str) -> None:
        if self.ranks.main:
            tqdm.write(message)

    def run(self) -> dict[str, Any]:
        """Train to the last step, evaluating and checkpointing on schedule; returns the metrics."""
        if self.ranks.main:
            for folder in (self.checkpoint_dir, self.model_path.parent, self.metrics_dir):
                _check_writable(folder)
        runtime, cfg = self.params.runtime, self.cfg
        tokens_per_step = cfg.batch_size * self.seq_len
        self._say(f"training {self.raw_model.num_params():,} parameters on {self.device.type} x "
                  f"{self.ranks.world} ({self.precision}): {self.total_steps} steps "
                  f"({self.sampler.steps_per_epoch} per epoch), {tokens_per_step:,} tokens per step")
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (runtime.progress and self.ranks.main))
        session_time = window_time = 0.0
        session_steps = window_steps = 0
        first_step = self.step + 1
        while self.step < self.total_steps:
            started = time.perf_counter()
            loss = self._train_step()
            elapsed = time.perf_counter() - started
            self.step += 1
            self.train_time_s += elapsed
            window_time, window_steps = window_time + elapsed, window_steps + 1
            if self.step > first_step:  # a session's first step (allocation, torch.compile) is no throughput
                session_time, session_steps = session_time + elapsed, session_steps + 1
            self.log.add_loss(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step * window_steps / window_time:,.0f}",
                            refresh=False)
            last_step = self.step == self.total_steps
            if self.step % runtime.log_interval == 0 or last_step:
                lr = lr_at(self.step - 1, self.total_steps, cfg)
                rate = tokens_per_step * window_steps / window_time
                mean_loss = self.log.add_train_row(self.step, lr, rate)
                self.latest.update(train_loss=mean_loss, tokens_per_sec=rate)
                epoch = (self.step - 1) // self.sampler.steps_per_epoch
                self._say(f"step {self.step}/{self.total_steps} | epoch {epoch} | loss {mean_loss:.4f} "
                          f"| lr {lr:.3e} | {rate:,.0f} tok/s")
                window_time, window_steps = 0.0, 0
            if self.step % cfg.eval_interval == 0 or last_step:
                self._evaluate()
            if self.step % cfg.checkpoint_interval == 0 or last_step:
                self._save(self.checkpoint_dir / LAST)
        bar.close()
        if session_steps:
            self.latest["tokens_per_sec"] = tokens_per_step * session_steps / session_time
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        """Write models/model.pt, metrics/train.json and the curves (rank 0); return the metrics."""
        latest = self.latest
        metrics: dict[str, Any] = {
            "train_loss": latest.get("train_loss"), "val_loss": latest.get("val_loss"),
            "val_ppl": math.exp(latest["val_loss"]) if "val_loss" in latest else None,
            "val_bpb": latest.get("val_bpb"), "tokens_per_sec": latest.get("tokens_per_sec"),
            "num_params": self.raw_model.num_params(), "train_time_s": round(self.train_time_s, 3),
            "device": self.device.type, "steps": self.step,
            "epochs": round(self.step / self.sampler.steps_per_epoch, 4),
        }
        if metrics["tokens_per_sec"] is not None:
            utilisation = mfu(metrics["tokens_per_sec"] / self.ranks.world, self.raw_model.flops_per_token(),
                              self.device, self.precision)
            if utilisation is not None:
                metrics["mfu"] = utilisation
        if self.ranks.main:
            run_params = {"model": section_dict(self.params.model), "train": section_dict(self.params.train)}
            extra = {"step": self.step, "metrics": metrics, "params": run_params}
            try:
                save_model_file(self.model_path, self.raw_model, self.model_config, self.tokenizer_sha256,
                                extra)
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
        trainer = Trainer(params, device, ranks, shards_dir=Path(shards_dir),
                          tokenizer_path=Path(tokenizer_path), checkpoint_dir=Path(checkpoint_dir),
                          model_path=Path(model_path), metrics_dir=Path(metrics_dir))
        return trainer.run()
    finally:
        if joined:
            dist.destroy_process_group()
