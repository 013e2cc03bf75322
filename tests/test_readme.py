"""The README, followed as a user follows it: a fresh clone, `make repro` with nothing activated, then
every shell command of the README's code blocks, in order and as printed, after
`source .venv/bin/activate` (the README's one rule for its commands).

The clone is of this working tree (committed or not) with tiny params (tests/pipeline_project.py) on
tiny Shakespeare from ../shared/data; `.venv` in it is this test run's virtual environment, which
`make` finds up to date, so nothing is installed. Each README command is in RUN (run here: as
printed, or with placeholders filled and, for the long CPU run, extra `-S` flags that shrink it) or
in NOT_RUN with the reason it cannot run on this machine; a command in neither fails
test_every_readme_command_is_run_or_excused.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pipeline_project
import pytest
import yaml
from pipeline_project import STAGES, assert_renders_offline, edit_params, read_params, stages_ran, tiny_params

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
BARE_PATH = "/usr/local/bin:/usr/bin:/bin"  # a login shell's PATH: no virtual environment on it
# The README's long CPU run (and the experiments that build on it), shrunk to seconds: the same layers,
# a shorter context, smaller batches, fewer steps and a smaller vocabulary.
SHRINK = ("-S tokenizer.vocab_size=300 -S model.max_seq_length=32 -S train.batch_size=8 -S train.max_steps=6 "
          "-S train.eval_interval=3 -S train.checkpoint_interval=3 -S train.eval_batches=2 "
          "-S generate.max_length=8")

NOT_RUN = {
    "make test": "runs this test suite (CI runs it through `bash .ci/run`); from inside the suite it would "
                 "start the suite again",
    "CUDA_VISIBLE_DEVICES=0 dvc queue start -j 1": "needs GPUs, one per queue worker",
    "CUDA_VISIBLE_DEVICES=1 dvc queue start -j 2": "needs GPUs, one per queue worker",
    "CUDA_VISIBLE_DEVICES=2 dvc queue start -j 3": "needs GPUs, one per queue worker",
    "torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr node0.example --master-port 29500 "
    "stages/train.py": "needs two machines with 8 GPUs each",
    "torchrun --nnodes 2 --node-rank 1 --nproc-per-node 8 --master-addr node0.example --master-port 29500 "
    "stages/train.py": "needs two machines with 8 GPUs each",
    "dvc commit train": "records the outputs of the two-machine torchrun run above",
    "make bench": "installs the bench extras (HF transformers, tokenizers) from PyPI and runs minutes of "
                  "benchmarks: measurements, not checks",
    **dict.fromkeys([
        "python benchmarks/quality.py --steps 800 --optimizers adamw --lr 2e-3 --precisions fp32 bf16 "
        "--seeds 1 2 1337",
        "python benchmarks/quality.py --steps 150 --optimizers muon --lr 3e-4 --d-model 512 --layers 6 "
        "--heads 8 --d-ff 2048 --batch 8 --precisions fp32 bf16 --seeds 1 2 --threads 1",
        "python benchmarks/train.py --rounds 20",
        "python benchmarks/train.py --rounds 20 --threads 1 --cpu-time",
        "python benchmarks/generate.py --repeats 5 --threads 1 --cpu-time",
        "python benchmarks/quality.py --optimizers adamw muon --lr 2e-3 --min-lr-fraction 0 --seeds 1337 1 2",
    ], "a benchmark (minutes to an hour, the HF columns need the bench extras): a measurement, not a check"),
}


def readme_commands() -> list[str]:
    """Every command of the README's ```bash blocks: continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            command = " ".join(line.split(" #")[0].split())
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


class Session:
    """A user's shell in the clone: every command after `source .venv/bin/activate`, nothing else on PATH."""

    def __init__(self, clone: Path) -> None:
        self.clone, self.other = clone, clone.parent / "other-clone"
        self.experiments: list[str] = []
        # no venv active, and Python writes its bytecode caches, as in a user's shell (a test runner's
        # PYTHONDONTWRITEBYTECODE hid DVC hashing them into the stages' deps)
        unset = ("VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
        self.env = {k: v for k, v in os.environ.items() if k not in unset}
        self.env.update(PATH=BARE_PATH, DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                        GIT_TERMINAL_PROMPT="0", GIT_AUTHOR_NAME="tests", GIT_COMMITTER_NAME="tests",
                        GIT_AUTHOR_EMAIL="tests@example.com", GIT_COMMITTER_EMAIL="tests@example.com")

    def run(self, command: str, where: Path | None = None, activate: bool = True,
            timeout: float = 300) -> str:
        """Run `command` in bash in the clone (or `where`); its output; fail with it on a non-zero exit."""
        where = where or self.clone
        script = f"source .venv/bin/activate && {command}" if activate else command
        env = {**self.env, "DVC_SITE_CACHE_DIR": str(where / ".dvc" / "tmp" / "site_cache")}
        done = subprocess.run(["bash", "-c", script], cwd=where, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stdout[-4000:]}"
        return done.stdout


def make_repro(s: Session, command: str) -> None:
    """`make repro` with nothing activated; VENV names this run's venv, which make finds up to date."""
    venv = f"VENV={VENV}"
    assert subprocess.run(["make", "-q", "install", venv], cwd=s.clone, env=s.env).returncode == 0, \
        "make would reinstall into this test run's venv: run `make install` in the checkout first"
    output = s.run(f"{command} {venv}", activate=False)
    assert stages_ran(output) == list(STAGES), output


def samples(text: str) -> list[str]:
    """The sample texts of `llm generate` output or reports/samples.txt, after their headers."""
    return [part.rstrip("\n") for part in re.split(r"^=== sample \d+ ===\n", text, flags=re.MULTILINE)[1:]]


def generate(s: Session, command: str) -> None:
    """The README's `llm generate`; and with no options, the samples of reports/samples.txt again."""
    assert samples(s.run(command))[0].startswith("Once upon a time")
    written = samples((s.clone / "reports" / "samples.txt").read_text(encoding="utf-8"))
    assert len(written) == 2 and samples(s.run("llm generate")) == written


def experiment(s: Session, command: str, suffix: str = "") -> None:
    """An experiment run in the workspace (trained, or restored from DVC's cache when an earlier run had
    its params: lr-3e-3 repeats tiny-cpu); remember its name for the placeholders below."""
    output = s.run(f"{command} {suffix}".strip())
    s.experiments += re.findall(r"Ran experiment\(s\): (\S+)", output)
    assert "train" in stages_ran(output) or "Stage 'train' is cached" in output, output


def runs(s: Session, command: str) -> None:
    """`llm runs`: a row for every experiment of the commit (none yet: the workspace), best first."""
    lines = s.run(command).splitlines()
    assert lines[0].split()[:2] == ["run", "valid_bpb"], lines
    names = [line.split()[0] for line in lines[1:]]
    experiments = s.run("dvc exp list --name-only").split()
    assert set(experiments) <= set(names) and (experiments or "workspace" in names), lines
    scored = [float(line.split()[1]) for line in lines[1:] if line.split()[1] != "-"]
    assert scored == sorted(scored) and len(scored) >= len(experiments), lines


def compare(s: Session, command: str) -> None:
    """`llm compare` of the three runs just made: one PNG, all three in it."""
    output = s.run(command)
    assert "lr-1e-3, lr-3e-3, lr-1e-2 against step" in output, output
    assert (s.clone / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def only_changed(s: Session, command: str) -> None:
    """The readable `dvc exp show`: the learning rate that differs, no column of dependency hashes."""
    output = s.run(command)
    assert "learning_rate" in output and "llm/model.py" not in output, output


def plots(page: str) -> Callable[[Session, str], None]:
    """A plots command, then a check of the page it wrote."""
    def step(s: Session, command: str) -> None:
        s.run(command.replace("<exp-a>", s.experiments[0]).replace("<exp-b>", s.experiments[1]))
        assert_renders_offline(s.clone / page / "index.html")
    return step


def keep_best(s: Session, command: str) -> None:
    """`dvc exp apply ... && git add -A && git commit`: the files the README wrote are not committed."""
    s.run(command.replace("<exp-name>", s.experiments[1]))
    committed = s.run("git show --name-only --format= HEAD").split()
    assert "params.yaml" in committed
    assert not [f for f in committed
                if f.split("/")[0] in ("runs.json", "plots-compare", "dvc_plots", "compare.png")]


def queue_start(s: Session, command: str) -> None:
    """Start the workers, and wait until they have run the queue."""
    s.run(command)
    deadline = time.monotonic() + 400
    while re.search(r"\b(Queued|Running)\b", s.run("dvc queue status")):
        assert time.monotonic() < deadline, s.run("dvc queue status")
        time.sleep(5)  # each look costs a DVC start-up, on the cores the workers train on


def queue_status(s: Session, command: str) -> None:
    status = s.run(command)
    assert status.count("Success") == 4, status


def remote_add(s: Session, command: str) -> None:
    """The README's `dvc remote add`, with a local folder for the bucket (its comment's last option)."""
    s.run(command.replace("s3://my-bucket/llm", str(s.clone.parent / "remote")))


def pull(s: Session, command: str) -> None:
    """`dvc pull` in another clone: it finds the remote through the committed .dvc/config."""
    subprocess.run(["git", "clone", "-q", str(s.clone), str(s.other)], check=True, env=s.env)
    (s.other / ".venv").symlink_to(VENV)
    s.run(command, where=s.other)
    assert (s.other / "models" / "model.pt").is_file()


def repro_pull(s: Session, command: str) -> None:
    output = s.run(command, where=s.other)
    assert stages_ran(output) == [], output


def suite_file(s: Session, command: str) -> None:
    """A test file of the suite, in a clone whose params.yaml has values of its own and an uncommitted
    train.resume: the tests never read them."""
    edit_params(s.clone, train={"resume": "checkpoints/not-there.pt"})
    s.run(command)


def as_printed(s: Session, command: str) -> None:
    s.run(command)


RUN: dict[str, Callable[[Session, str], None]] = {
    "make repro": make_repro,
    "source .venv/bin/activate": as_printed,  # and before every command below
    "llm runs": runs,  # after make repro, after the experiments below, and after the queued grid
    'llm generate --prompt "Once upon a time" --checkpoint models/model.pt': generate,
    "dvc exp run -n tiny-cpu -S data.dataset=text_files "
    "-S data.text_files_dir=../shared/data/tinyshakespeare -S tokenizer.vocab_size=1024 -S model.d_model=128 "
    "-S model.num_heads=4 -S model.num_layers=2 "
    "-S model.d_ff=512 -S model.max_seq_length=128 -S model.dropout=0 -S train.batch_size=16 "
    "-S train.max_steps=1500 -S train.warmup_steps=75 -S train.optimizer=adamw -S train.learning_rate=0.002 "
    "-S train.min_lr=0 -S train.eval_interval=500 -S train.eval_batches=20 "
    "-S train.checkpoint_interval=500 -S generate.max_length=50":
        lambda s, command: experiment(s, command, SHRINK),
    "dvc exp run -n lr-1e-3 -S train.learning_rate=1e-3": experiment,
    "dvc exp run -n lr-3e-3 -S train.learning_rate=3e-3": experiment,
    "dvc exp run -n lr-1e-2 -S train.learning_rate=1e-2": experiment,
    "llm compare lr-1e-3 lr-3e-3 lr-1e-2 -o compare.png": compare,
    "dvc exp show --only-changed --drop /": only_changed,
    "dvc exp show --json > runs.json": as_printed,
    "dvc plots show": plots("dvc_plots"),
    "dvc plots diff": plots("dvc_plots"),
    "dvc plots diff <exp-a> <exp-b> -o plots-compare": plots("plots-compare"),
    "dvc metrics diff": as_printed,
    'dvc exp apply <exp-name> && git add -A && git commit -m "..."': keep_best,
    "dvc exp run --queue -S model.num_layers=2,4 -S train.learning_rate=3e-4,1e-3": as_printed,
    "dvc queue start -j 2": queue_start,
    "dvc queue status": queue_status,
    "dvc remote add -d storage s3://my-bucket/llm": remote_add,
    'git add .dvc/config && git commit -m "DVC remote"': as_printed,
    "dvc push": as_printed,
    "dvc pull": pull,
    "dvc repro --pull": repro_pull,
    "pytest -q tests/test_docs.py -x": suite_file,
    "make lint": as_printed,
}


def test_every_readme_command_is_run_or_excused() -> None:
    commands = set(readme_commands())
    unknown = sorted(commands - set(RUN) - set(NOT_RUN))
    assert not unknown, f"README commands neither run by tests/test_readme.py nor excused: {unknown}"
    stale = sorted((set(RUN) | set(NOT_RUN)) - commands)
    assert not stale, f"tests/test_readme.py lists commands the README no longer has: {stale}"
    assert not set(RUN) & set(NOT_RUN)


def tracked_copy(dest: Path) -> None:
    """This working tree's files as git sees them (tracked, and untracked but not ignored), committed."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    identity = ["-c", "user.name=tests", "-c", "user.email=tests@example.com"]
    for command in (["init", "-q"], ["add", "-A"], [*identity, "commit", "-q", "-m", "working tree"]):
        subprocess.run(["git", *command], cwd=dest, check=True, capture_output=True)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):
    """A fresh clone with tiny params committed, ../shared beside it and .venv = this run's venv."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs the tests to run in the project's virtual environment (make test)")
    top = tmp_path_factory.mktemp("readme")
    (top / "source").mkdir()
    tracked_copy(top / "source")
    subprocess.run(["git", "clone", "-q", str(top / "source"), str(top / "clone")], check=True)
    clone = top / "clone"
    (top / "shared").symlink_to(shared_data.parent)
    (clone / ".venv").symlink_to(VENV)
    os.utime(clone / "pyproject.toml", (946_684_800, 946_684_800))  # older than the venv's install stamp
    text_files = (top / "shared" / "data" / "tinyshakespeare").resolve()
    # Small valid and test splits: scoring them is most of an experiment's time on a CPU.
    edit_params(clone, **tiny_params(data={"dataset": "text_files", "text_files_dir": str(text_files),
                                           "val_fraction": 0.01, "test_fraction": 0.01}))
    subprocess.run(["git", "-c", "user.name=tests", "-c", "user.email=tests@example.com", "commit", "-q",
                    "-am", "tiny params"], cwd=clone, check=True)
    s = Session(clone)
    yield s
    subprocess.run(["bash", "-c", "source .venv/bin/activate && dvc queue stop --kill"], cwd=clone, env=s.env,
                   capture_output=True, timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(600)  # every README command in turn: ~190 s on a busy 2-core machine
def test_readme_commands_work_as_printed_in_a_fresh_clone(session: Session) -> None:
    for command in readme_commands():
        if command in RUN:
            RUN[command](session, command)
    params = yaml.safe_load((session.clone / "params.yaml").read_text(encoding="utf-8"))
    assert params["train"]["resume"] == "checkpoints/not-there.pt"  # the suite ran with it set


def test_tiny_projects_take_no_value_from_the_checkouts_params(session: Session, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-to-end tests build projects from a checkout; the user's params.yaml there is not theirs."""
    edit_params(session.clone, train={"learning_rate": 0.123, "resume": "checkpoints/not-there.pt"})
    monkeypatch.setattr(pipeline_project, "ROOT", session.clone)
    built = pipeline_project.build_project(tmp_path / "p", tmp_path)
    assert read_params(built) == tiny_params(data={"dataset": "text_files", "text_files_dir": str(tmp_path)})
