"""The fine-tuning job (``--sft``) at DP 2, TP 2 and PP 2: it trains on a conversation file
and, at its last iteration, reports the saved model's validation loss over the whole
validation file as one process computes it from the samples (positions, masks and loss masks
of `mp.data.sft_dataset`), micro-batch by micro-batch; micro-batches whose samples are cut
before the assistant speaks keep no token and are left out of the mean, not NaN. Then
``tools/generate.py --chat`` answers from the saved model as greedy decoding written out
does, from the chatml template written out."""

import contextlib
import io
import re

import pytest
import torch
from harness import run_distributed
from jobs import generated
from test_checkpoint_flags import _variant
from test_config import TINY
from test_data_sft import _line, _write
from torch.utils.data import default_collate

from mp import parallel_state as ps
from mp.checkpointing import job as checkpoint_job
from mp.config import load_config
from mp.data.dataset_builder import build_sft_datasets
from mp.data.prompt_formats import get_prompt_format
from mp.data.tokenizer import ByteLevelTokenizer
from mp.training.gpt_step import get_batch
from mp.training.pretrain import pretrain, setup_model_and_optimizer

SEQ, MBS, SEED = 64, 2, 7
VALIDATION = re.compile(r"^validation at iteration 3 \| lm loss (\S+) \|", re.MULTILINE)


def _questions(path, questions: list[str]) -> str:
    """A conversation file: each question, answered with it reversed."""
    return _write(path, [_line(f"user:{q}", f"assistant:{q[::-1]}!") for q in questions])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Training and validation files; the validation questions 5 to 16 are too long for any
    of the answer to fit in ``SEQ`` tokens after the chatml headers."""
    root = tmp_path_factory.mktemp("sft")
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    train = [f"{a} {b}" for a in words for b in words[:3]]
    valid = [f"{w} {i}" for i, w in enumerate(words[:4])] + [w * n for w in words
                                                             for n in (4, 5)][:12]
    return _questions(root / "train.jsonl", train), _questions(root / "valid.jsonl", valid)


LAYOUTS = {"DP2": (1, 1), "TP2": (2, 1), "PP2": (1, 2)}  # name -> (TP, PP) on 2 ranks


def _config(files, tmp_path, layout: str):
    tp, pp = LAYOUTS[layout]
    return load_config(TINY, [
        "--sft", "--sft-tokenizer-prompt-format", "chatml", "--train-data-path", files[0],
        "--valid-data-path", files[1], "--full-validation", "--eval-iters", "0",
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
        "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--global-batch-size", "4",
        "--train-iters", "3", "--eval-interval", "3", "--lr", "3e-3", "--lr-warmup-iters", "0",
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--num-workers", "0", "--seed", str(SEED),
        "--log-interval", "1", "--logging.progress", "false", "--save", str(tmp_path / "ckpt")],
        world_size=2)


def _job(cfg) -> str:
    ps.initialize_model_parallel(cfg.model.tensor_model_parallel_size,
                                 cfg.model.pipeline_model_parallel_size)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(cfg)
    return out.getvalue()


_RUNS: dict[str, tuple] = {}


def _trained(files, tmp_path_factory, layout: str):
    """The job at ``layout`` (run once per module): its config and what rank 0 printed."""
    if layout not in _RUNS:
        cfg = _config(files, tmp_path_factory.mktemp(layout), layout)
        _RUNS[layout] = cfg, run_distributed(2, _job, cfg)[0]
    return _RUNS[layout]


def _saved_model(cfg):
    """The model ``cfg``'s job saved, in this one process, in eval mode."""
    ps.initialize_model_parallel(1)
    tp = cfg.model.tensor_model_parallel_size  # the same vocabulary padding at TP 1
    serial = _variant(cfg, model={"tensor_model_parallel_size": 1,
                                  "pipeline_model_parallel_size": 1,
                                  "make_vocab_size_divisible_by": 16 * tp},
                      training={"load": cfg.training.save, "save": None})
    model, optimizer, scheduler = setup_model_and_optimizer(serial)
    checkpoint_job.resume(checkpoint_job.start_point(serial), model, optimizer, scheduler)
    return model[0].eval()


def _direct_loss(cfg, files, dp: int) -> tuple[float, int]:
    """One process: the mean over the validation epoch's micro-batches (the groups of ``MBS x
    dp`` samples a full validation reads) of each one's mean loss over its kept tokens, with
    the saved model; and how many micro-batches kept no token."""
    model = _saved_model(cfg)
    valid = build_sft_datasets(None, None, SEQ, SEED, 0, None, 0,
                               per_split_data_path=[[files[0]], [files[1]], None],
                               tokenizer=ByteLevelTokenizer(),
                               prompt_format=get_prompt_format("chatml"))[1]
    means, empty = [], 0
    for start in range(0, len(valid) // (MBS * dp) * MBS * dp, MBS):
        batch = get_batch(iter([default_collate([valid[i]
                                                 for i in range(start, start + MBS)])]))
        with torch.no_grad():
            loss = model(batch["tokens"], batch["position_ids"],
                         batch["attention_mask"].mask(),  # the dense mask, not the job's gathers
                         labels=batch["labels"]).double()
        kept = batch["loss_mask"].double()
        if kept.sum() == 0:
            empty += 1
        else:
            means.append(((loss * kept).sum() / kept.sum()).item())
    return sum(means) / len(means), empty


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_job_reports_the_loss_on_the_assistants_words(files, tmp_path_factory, layout):
    cfg, out = _trained(files, tmp_path_factory, layout)
    losses = [float(x) for x in re.findall(r"^iteration \d/3 .*\| lm loss (\S+) \|", out,
                                           re.MULTILINE)]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses), out
    reported = VALIDATION.search(out)
    assert reported, out
    tp, pp = LAYOUTS[layout]
    want, empty = run_distributed(1, _direct_loss, cfg, files, 2 // (tp * pp))[0]
    assert empty > 0  # the mean leaves those out
    assert float(reported.group(1)) == pytest.approx(want, rel=2e-5)


def _greedy(cfg, prompt: list[int], count: int) -> list[int]:
    """``count`` tokens of greedy decoding from ``prompt``, the whole sequence run each step
    (no cache), stopping after the end-of-document id."""
    model, ids = _saved_model(cfg), list(prompt)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(model(torch.tensor([ids]))[0, -1, :257].argmax()))
            if ids[-1] == ByteLevelTokenizer.EOD_ID:
                break
    return ids[len(prompt):]


def test_chat_answers_in_the_jobs_prompt_format(files, tmp_path_factory, capsys):
    cfg, _ = _trained(files, tmp_path_factory, "DP2")
    template = "<|im_start|>user\nbeta<|im_end|>\n<|im_start|>assistant\n"  # 54 bytes
    want = run_distributed(1, _greedy, cfg, list(template.encode()), 10)[0]
    printed = generated(["--load", cfg.training.save, "--chat", "--prompt", "beta",
                         "--greedy", "--max-new-tokens", "10"], capsys)
    answer = ByteLevelTokenizer().detokenize([t for t in want if t != ByteLevelTokenizer.EOD_ID])
    assert printed == f"beta\n{'-' * 40}\n{answer}\n\n"
