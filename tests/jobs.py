"""The pretraining job of ``launch/pretrain_gpt.py`` run in the simulated cluster's ranks.

    from harness import run_distributed
    from jobs import run_job
    printed = run_distributed(4, run_job, [*flags])[0]  # what rank 0 printed

`run_job` parses the flags and runs the launcher's own `train` (the model-parallel groups,
the printed config and notices, `mp.training.pretrain.pretrain`) on the pool's process group,
so a test of what a job computes pays for no process start-up. What only a launched job shows
(torchrun's process group, signals, a rank's death taking the job down) stays in tests that
launch one. `exact_lines` makes rank 0 print each iteration's loss, gradient norm and learning
rate exactly, in a launched job (its script enters it) or here. `script` imports any of the
repository's scripts, so that a test can call its ``main`` where a refusal needs no process of
its own, and `generated` runs ``tools/generate.py`` here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "pretrain_gpt.py")
GENERATE = os.path.join(ROOT, "tools", "generate.py")


def script(path: str | os.PathLike):
    """The script at ``path`` as a module (imported once per process)."""
    name = f"script_{os.path.splitext(os.path.relpath(path, ROOT))[0].replace(os.sep, '_')}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return module


def launcher():
    """``launch/pretrain_gpt.py`` as a module."""
    return script(LAUNCH)


@contextlib.contextmanager
def exact_lines():
    """Rank 0 also prints ``exact ITERATION LOSS GRAD_NORM LR`` (``float.hex``) with each
    log line's iteration: the log line rounds them."""
    from mp.training.logger import TrainingLogger

    real = TrainingLogger.training_iteration

    def exact(self, iteration, consumed, losses, lr, grad_norm, *rest, **extras):
        if self.enabled:
            print(f"exact {iteration} {losses['lm loss'].hex()} {grad_norm.hex()} {lr.hex()}",
                  flush=True)
        return real(self, iteration, consumed, losses, lr, grad_norm, *rest, **extras)

    TrainingLogger.training_iteration = exact
    try:
        yield
    finally:
        TrainingLogger.training_iteration = real


def generated(argv: list[str], capsys) -> str:
    """What ``tools/generate.py`` prints for ``argv``, run here (pytest's ``capsys``) as the
    one-process world it makes and destroys itself without torchrun."""
    capsys.readouterr()  # what the test printed before is not the tool's
    script(GENERATE).main(argv)
    return capsys.readouterr().out


def refusal(argv: list[str], monkeypatch, capsys) -> str:
    """What ``launch/pretrain_gpt.py``'s ``main`` says refusing ``argv``, called here in
    torchrun's world of 4 with no rendezvous to join (pytest's ``monkeypatch`` and ``capsys``):
    it must exit with status 2 before making any process group."""
    import pytest
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit) as exited:
        launcher().main(argv)
    assert exited.value.code == 2
    assert not dist.is_initialized()
    return capsys.readouterr().err


def exact_values(printed: str) -> dict[int, tuple[str, ...]]:
    """``{iteration: (loss, grad norm, lr)}`` from `exact_lines`' lines in ``printed``."""
    return {int(i): tuple(rest) for i, *rest in
            (line.split()[1:] for line in printed.splitlines() if line.startswith("exact "))}


@contextlib.contextmanager
def environment(env: dict[str, str]):
    """``env`` set in ``os.environ`` meanwhile."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def run_job(argv: list[str], exact: bool = False, env: dict[str, str] | None = None) -> str:
    """What this rank prints running the job of ``argv`` (``launch/pretrain_gpt.py``'s flags)
    on the pool's ranks, with `exact_lines` when ``exact`` and ``env`` in the environment."""
    import torch.distributed as dist

    from mp.config import parse_args

    out = io.StringIO()
    with environment(env or {}), contextlib.redirect_stdout(out), \
            exact_lines() if exact else contextlib.nullcontext():
        cfg = parse_args(argv, world_size=dist.get_world_size(), prog="pretrain_gpt.py")
        launcher().train(cfg, argv)
    return out.getvalue()
