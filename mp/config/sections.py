"""The ``data`` and ``logging`` sections of a job config.

(The ``model`` section is `mp.model.TransformerConfig`, the ``training`` section
`mp.config.training_section.TrainingConfig`.) Field names follow Megatron-LM's
arguments (``--lr-warmup-iters`` is ``lr_warmup_iters``). Each section checks its own values in
``__post_init__`` with messages that name the key and the rule; values are already of their
field's type when built by the loader (`mp.config.coerce`). Rules that join sections, or need
the world size, are `JobConfig.validate`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

from mp.config.coerce import ConfigError
from mp.config.section import Section
from mp.data.dataset_builder import SPLIT_NAMES, check_validation_sets, parse_data_sources
from mp.data.prompt_formats import PROMPT_FORMATS
from mp.data.samplers import DATALOADER_TYPES
from mp.data.tokenizer import TOKENIZER_TYPES

#: The ``data.data_path`` entry that stands for the embedded default corpus
#: (`mp.data.corpus.prepare_default_corpus`), so that pretraining needs no download.
BUILTIN_DATA_PATH = "builtin"
#: ``data.split`` when ``data.data_path`` is cut without one (Megatron-LM's legacy default).
DEFAULT_SPLIT = "969,30,1"


@dataclass
class DataConfig(Section):
    """Where the tokens come from and how they are tokenized (Megatron's data arguments).

    ``data_path`` is a list of dataset prefixes (``.bin``/``.idx``), or of weights and prefixes
    in turn (``[0.3, a, 0.7, b]``); `BUILTIN_DATA_PATH` stands for the embedded default corpus
    (the default). ``split`` gives train/valid/test proportions of each dataset's documents
    (default `DEFAULT_SPLIT`). Instead, as in Megatron, ``train_data_path``, ``valid_data_path``
    and ``test_data_path`` (lists of the same form; valid and test optional) give each split
    whole datasets of its own, with neither ``data_path`` nor ``split``. Megatron's
    ``data_args_path`` names a file whose whitespace-separated words are ``data_path`` (a
    blend too long for a command line), ``per_split_data_args_path`` a JSON file
    ``{"train": ..., "valid": ..., "test": ...}`` of the three (each a list, or a string of
    words; valid and test optional): both are read here, and the resolved config holds the
    paths they gave, not the file. ``tokenizer_type``
    and its files are `mp.data.tokenizer.build_tokenizer`'s arguments. ``data_cache_path`` holds
    the index caches (``None``: beside the data). ``eod_mask_loss`` leaves end-of-document
    tokens out of the loss. ``mock_data`` (Megatron's ``--mock-data``) trains on random tokens
    of ``model.vocab_size`` instead, reading no file and building no tokenizer.
    ``reset_position_ids`` and ``reset_attention_mask`` (Megatron's) keep the documents packed
    into a sample apart (`mp.data.document_masks`). ``dataloader_type`` is Megatron's order of
    the samples, ``single`` (once, in dataset order) or ``cyclic`` (epoch after epoch, each
    shuffled, within each data-parallel rank's shard unless ``data_sharding`` is off):
    `mp.data.samplers`. ``full_validation`` (Megatron's ``--full-validation``) makes every
    validation cover the whole validation split once instead of ``training.eval_iters``
    batches; ``multiple_validation_sets`` (Megatron's ``--multiple-validation-sets``) evaluates
    each ``valid_data_path`` dataset on its own, one loss each (`mp.training.data`).
    ``sft`` (Megatron's ``--sft``) fine-tunes on conversations: the paths are JSON Lines
    conversation files (`mp.data.conversations`; ``builtin`` stands for conversations made
    from the embedded corpus, `mp.data.conversation_corpus`), made into samples by the
    prompt format ``sft_tokenizer_prompt_format`` (`mp.data.prompt_formats`), the loss on the
    assistant's words only (`mp.data.sft_dataset`).
    """

    section: ClassVar[str] = "data"

    data_path: list[str] | None = None  # default [builtin] unless the splits have their own
    split: str | None = None  # default DEFAULT_SPLIT with data_path
    train_data_path: list[str] | None = None  # or each split from its own datasets
    valid_data_path: list[str] | None = None
    test_data_path: list[str] | None = None
    tokenizer_type: str = "ByteLevelTokenizer"
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_model: str | None = None
    eod_token: str | None = None
    data_cache_path: str | None = None
    num_workers: int = 2
    eod_mask_loss: bool = False
    mock_data: bool = False  # random tokens instead of data_path (mp.data.mock)
    reset_position_ids: bool = False  # positions restart after each end-of-document token
    reset_attention_mask: bool = False  # tokens attend within their own document only
    vocab_size: int | None = None  # NullTokenizer: token ids below it, and the EOD id itself
    mmap_bin_files: bool = True  # False: read each .bin file into memory instead of mapping it
    dataloader_type: str = "single"  # or "cyclic" (Megatron's --dataloader-type)
    data_sharding: bool = True  # cyclic: each DP rank shuffles its own shard (--no-data-sharding)
    full_validation: bool = False  # each validation covers the validation split whole, once
    multiple_validation_sets: bool = False  # each valid_data_path dataset evaluated on its own
    data_args_path: str | None = None  # read into data_path (Megatron's --data-args-path)
    per_split_data_args_path: str | None = None  # JSON read into the three *_data_path
    sft: bool = False  # the paths are conversation files, trained on the assistant's words
    sft_tokenizer_prompt_format: str = "nemotron-h-aligned"  # mp.data.prompt_formats

    def __post_init__(self) -> None:
        self._read_data_args()
        per_split = self.per_split_data_path
        if per_split is None:
            self.data_path = [BUILTIN_DATA_PATH] if self.data_path is None else self.data_path
            self.split = DEFAULT_SPLIT if self.split is None else self.split
        elif self.train_data_path is None:
            raise ConfigError(f"data.valid_data_path={self.valid_data_path!r} and data."
                              f"test_data_path={self.test_data_path!r} without data."
                              "train_data_path: the run needs its training data")
        if self.mock_data and (self.full_validation or self.multiple_validation_sets):
            flag = "full_validation" if self.full_validation else "multiple_validation_sets"
            raise ConfigError(f"data.{flag}=true needs datasets of documents (Megatron: GPT "
                              "datasets only); data.mock_data=true draws random samples")
        try:
            blends = parse_data_sources(self.data_path, self.split, per_split)
            check_validation_sets(blends, self.multiple_validation_sets, self.full_validation)
        except ValueError as error:
            raise ConfigError(f"{self.section}.{error}") from None
        self._one_of("tokenizer_type", TOKENIZER_TYPES)
        if self.dataloader_type == "external":
            raise ConfigError("data.dataloader_type='external' hands Megatron a data iterator "
                              "of the user's own; mp's job builds its loaders itself: use "
                              "'single' or 'cyclic'")
        self._one_of("dataloader_type", DATALOADER_TYPES)
        self._at_least("num_workers", 0)
        self._at_least("vocab_size", 1, optional=True)
        null = self.tokenizer_type == "NullTokenizer"
        if self.vocab_size is not None and not null:
            raise ConfigError(f"data.vocab_size={self.vocab_size} is for tokenizer_type "
                              f"NullTokenizer only; data.tokenizer_type={self.tokenizer_type!r} "
                              "has its own vocabulary (set model.vocab_size to change the model's)")
        if null and self.vocab_size is None:
            raise ConfigError("data.tokenizer_type='NullTokenizer' needs data.vocab_size (ids "
                              "0..V-1; V is the end-of-document id)")
        if null and not self.mock_data and self.data_path == [BUILTIN_DATA_PATH]:
            raise ConfigError("data.tokenizer_type='NullTokenizer' reads token ids, and the "
                              f"data.data_path={BUILTIN_DATA_PATH!r} corpus is text: give a "
                              "data_path preprocessed with it, or data.mock_data")
        if self.mock_data and (self.reset_position_ids or self.reset_attention_mask):
            raise ConfigError("data.reset_position_ids / reset_attention_mask need documents; "
                              "data.mock_data=true has none")
        self._one_of("sft_tokenizer_prompt_format", tuple(PROMPT_FORMATS))
        if self.sft:
            self._check_sft()

    def _check_sft(self) -> None:
        """What ``sft`` does not combine with."""
        if self.mock_data:
            raise ConfigError("data.sft=true reads conversations; data.mock_data=true draws "
                              "random tokens: keep one")
        for key in ("reset_position_ids", "reset_attention_mask"):
            if getattr(self, key):
                raise ConfigError(f"data.{key}=true with data.sft=true: SFT samples restart "
                                  "positions and attention at each conversation already")
        if self.tokenizer_type == "NullTokenizer":
            raise ConfigError("data.sft=true writes its prompt format as text, which "
                              "data.tokenizer_type='NullTokenizer' (token ids) cannot read")

    def _read_data_args(self) -> None:
        """Replace ``data_args_path`` and ``per_split_data_args_path`` by the paths their
        files hold (class doc)."""
        if self.data_args_path is not None:
            if self.data_path is not None:
                raise ConfigError(f"data.data_args_path={self.data_args_path!r} and data."
                                  "data_path both give the data: keep one")
            self.data_path = _read(self.data_args_path, "data_args_path").split()
            self.data_args_path = None
        if self.per_split_data_args_path is not None:
            path, self.per_split_data_args_path = self.per_split_data_args_path, None
            if self.per_split_data_path is not None:
                raise ConfigError(f"data.per_split_data_args_path={path!r} and data."
                                  "train/valid/test_data_path both give the data: keep one")
            try:
                splits = json.loads(_read(path, "per_split_data_args_path"))
            except json.JSONDecodeError as error:
                raise ConfigError(f"data.per_split_data_args_path={path!r} is not JSON: "
                                  f"{error}") from None
            if not isinstance(splits, dict) or not set(splits) <= set(SPLIT_NAMES):
                raise ConfigError(f"data.per_split_data_args_path={path!r} must hold an "
                                  f"object with keys among {list(SPLIT_NAMES)}")
            for split, paths in splits.items():
                if not (isinstance(paths, str) or isinstance(paths, list)
                        and all(isinstance(p, str | int | float) for p in paths)):
                    raise ConfigError(f"data.per_split_data_args_path={path!r}: {split!r} "
                                      "must be a list of paths (and weights) or a string")
                setattr(self, f"{split}_data_path",
                        paths.split() if isinstance(paths, str) else [str(p) for p in paths])

    @property
    def per_split_data_path(self) -> list[list[str] | None] | None:
        """``[train, valid, test]`` data paths when any is set (each split then has its own
        datasets), else None."""
        paths = [getattr(self, f"{split}_data_path") for split in SPLIT_NAMES]
        return None if paths == [None] * len(paths) else paths


def _read(path: str, key: str) -> str:
    """The text of the file ``data.key`` names (ConfigError when it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError as error:
        raise ConfigError(f"data.{key}={path!r}: {error.strerror}") from None


@dataclass
class LoggingConfig(Section):
    """What the training loop reports: a line every ``log_interval`` iterations, TensorBoard
    scalars when ``tensorboard_dir`` is set (the iteration's own values every
    ``tensorboard_log_interval`` iterations, the interval's rates with each line; the writer
    holds up to ``tensorboard_queue_size`` events before it writes them out), and a progress bar
    (``"auto"``: only when the output is a terminal). ``log_progress`` appends Megatron's job
    and throughput lines to ``progress.txt`` in ``training.save`` (`mp.training.progress_log`);
    ``record_memory_history`` records CUDA's allocations from the start and dumps their snapshot
    to ``memory_snapshot_path`` with each log line (Megatron's; `mp.training.logger`)."""

    section: ClassVar[str] = "logging"

    log_interval: int = 100
    tensorboard_dir: str | None = None
    tensorboard_log_interval: int = 1  # Megatron's: TensorBoard/W&B scalars every N iterations
    tensorboard_queue_size: int = 1000  # SummaryWriter's max_queue
    log_world_size_to_tensorboard: bool = False  # the scalar world-size, with the others
    progress: bool | str = "auto"
    log_params_norm: bool = False  # the L2 norm of all parameters, on each log line
    log_num_zeros_in_grad: bool = False  # the count of zero gradient elements, likewise
    wandb_project: str | None = None  # Weights & Biases: log there too (when installed)
    wandb_entity: str | None = None  # the W&B team or user the run goes to (None: default)
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None
    profile: bool = False  # profile iterations [profile_step_start, profile_step_end)
    use_pytorch_profiler: bool = False  # torch.profiler trace (else the CUDA profiler range)
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    log_progress: bool = False  # Megatron's progress.txt in training.save
    record_memory_history: bool = False  # CUDA only: the allocator's history, on every rank
    memory_snapshot_path: str = "snapshot.pickle"  # Megatron's default; the last rank dumps it

    def __post_init__(self) -> None:
        self._at_least("log_interval", 1)
        self._at_least("tensorboard_log_interval", 1)
        self._at_least("tensorboard_queue_size", 1)
        self._at_least("profile_step_start", 0)
        if self.profile_step_end <= self.profile_step_start:
            raise ConfigError(f"logging.profile_step_end={self.profile_step_end!r} must be "
                              f"after logging.profile_step_start={self.profile_step_start!r}")
        if self.profile and self.use_pytorch_profiler and self.tensorboard_dir is None:
            raise ConfigError("logging.use_pytorch_profiler=true writes its trace into "
                              "logging.tensorboard_dir (as Megatron does), which is not set")
        self._one_of("progress", ("auto", True, False))
        if not self.memory_snapshot_path:
            raise ConfigError(f"logging.memory_snapshot_path={self.memory_snapshot_path!r} "
                              "must name a file (where the memory snapshot is dumped)")
