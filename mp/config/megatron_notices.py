"""Megatron-LM's flags that mp accepts without effect, refuses, or takes some values of, each
with what the job says (`mp.config.overrides` checks them; `mp.config.megatron_flags` holds
the flags that set keys).

- `NO_EFFECT_FLAGS`: flags that change nothing in mp, each with the reason the job prints.
- `UNSUPPORTED_FLAGS`, `UNSUPPORTED_PREFIXES`: flags of features mp does not have, with what
  to say; `CHOICE_FLAGS`: flags of which mp has some values only.
"""

from __future__ import annotations

_LOSS_CHECK = ("mp always checks the loss: a non-finite one stops a bf16/fp32 run, and fp16's "
               "loss scaler skips the step")
_DCP = ("mp's checkpoints are torch.distributed.checkpoint directories: every rank writes and "
        "reads its own part")
_TIMING = "mp times whole iterations only (the log line's ms/iter)"
_TP_OVERLAP = ("it tunes --tp-comm-overlap (Transformer Engine's userbuffers), which mp does "
               "not do")
_ANY_LAYOUT = ("mp's checkpoints, optimizer state included, load at any parallel layout "
               "(docs/checkpoints.md)")
_DEPRECATED = "Megatron-LM ignores it too (deprecated)"
_STRAGGLER = ("mp has no straggler detector; every log line has the iteration's time "
              "(ms/iter), and --profile traces chosen steps")
_ONE_LOGGER = "it configures one_logger (NVIDIA's internal job telemetry), which mp does not have"
_FT = ("it enables NVIDIA's internal fault-tolerance package, which mp does not have; "
       "--distributed-timeout-minutes bounds how long a rank waits in a collective")
_WGRAD_DEFERRAL = ("it moves the output layer's weight-gradient products to the pipeline flush, "
                   "to overlap Transformer Engine's tensor-parallel communication "
                   "(--tp-comm-overlap), which mp does not do; the gradients are the same")

_EP_OVERLAP = ("it overlaps one micro-batch's expert-parallel all-to-alls with another's "
               "compute (delaying weight gradients for it), which mp does not do; the "
               "gradients are the same")
_DELAYED = ("it sets Transformer Engine's delayed scaling; mp's --fp8-recipe tensorwise scales "
            "each operand by its own amax at every product")

#: Megatron-LM flags that mp accepts and that change nothing in mp -> (how many values they
#: take, None for any number; why). A job started with one says so once (`no_effect_notices`).
NO_EFFECT_FLAGS: dict[str, tuple[int | None, str]] = {
    "--use-mcore-models": (0, "mp has one GPT, laid out as Megatron-Core's"),
    "--log-throughput": (0, "every log line has tokens/s, TFLOP/s per GPU and MFU"),
    "--log-timers-to-tensorboard": (0, ("mp times whole iterations, and TensorBoard always gets "
                                       "that time (iteration-time-ms)")),
    "--no-create-attention-mask-in-dataloader": (0, ("mp's loader never builds a causal mask; "
                                                    "attention applies causality itself")),
    "--attention-softmax-in-fp32": (0, "mp's softmax always computes in fp32"),
    "--log-memory-to-tensorboard": (0, ("TensorBoard always gets the peak memory "
                                       "(peak-memory-bytes)")),
    "--log-batch-size-to-tensorboard": (0, ("TensorBoard always gets the global batch size "
                                           "(batch-size)")),
    "--log-validation-ppl-to-tensorboard": (0, ("TensorBoard always gets the validation "
                                               "perplexity (validation lm loss PPL)")),
    "--data-impl": (1, ("mp reads Megatron's indexed format (.bin/.idx), memory-mapped unless "
                       "--no-mmap-bin-files")),
    "--distributed-backend": (1, "mp uses NCCL with CUDA and gloo on the CPU"),
    "--tiktoken-pattern": (1, "it configures Megatron's TikTokenizer, which mp does not have"),
    "--ckpt-format": (1, ("mp writes one format, which loads at any parallel layout as "
                         "torch_dist does (docs/checkpoints.md)")),
    "--transformer-impl": (1, ("mp always runs its own layers (Megatron's local ones), not "
                              "Transformer Engine's")),
    "--no-gradient-accumulation-fusion": (0, ("mp accumulates weight gradients into the fp32 "
                                              "main_grad buffer with a hook; it has no fused "
                                              "kernel to turn off")),
    "--accumulate-allreduce-grads-in-fp32": (0, ("mp accumulates and reduces gradients in fp32 "
                                                 "unless --grad-reduce-in-bf16")),
    "--no-persist-layer-norm": (0, "mp has no persistent layer-norm kernel to turn off"),
    "--fp16-lm-cross-entropy": (0, "mp's cross-entropy always computes in fp32"),
    "--tp-comm-overlap": (0, ("mp does not overlap tensor-parallel communication with the "
                              "matrix products (Transformer Engine's userbuffers)")),
    "--use-cpu-initialization": (0, "mp draws each weight on the device it lives on"),
    "--check-for-nan-in-loss-and-grad": (0, _LOSS_CHECK),
    "--no-check-for-nan-in-loss-and-grad": (0, _LOSS_CHECK),
    "--ckpt-fully-parallel-save": (0, _DCP),
    "--ckpt-fully-parallel-load": (0, _DCP),
    "--use-dist-ckpt": (0, _DCP),
    "--auto-detect-ckpt-format": (0, _DCP),
    "--no-async-strategy": (0, ("mp's --async-save writes with torch.distributed.checkpoint "
                                "from a background thread; it has no other strategy")),
    "--dist-ckpt-strictness": (1, ("mp always checks every tensor of a checkpoint by name and "
                                   "shape, and names what is missing or unexpected")),
    "--no-rope-fusion": (0, "mp has no fused RoPE kernel to turn off"),
    "--apply-query-key-layer-scaling": (0, ("its division of the scores by the layer number, "
                                            "undone in the softmax, guards fp16 scores; mp's "
                                            "SDPA core scales inside the kernel and every "
                                            "softmax computes in fp32")),
    "--cross-entropy-fusion-impl": (1, ("mp's fused cross-entropy is its own compiled one "
                                        "(--cross-entropy-loss-fusion)")),
    "--log-loss-scale-to-tensorboard": (0, ("TensorBoard always gets the loss scale "
                                           "(loss-scale)")),
    "--num-dataset-builder-threads": (1, "mp builds the dataset indices without a thread pool"),
    "--timing-log-level": (1, _TIMING),
    "--moe-token-dispatcher-type": (1, ("mp's experts trade tokens by all-to-all over the "
                                       "expert-parallel ranks (Megatron's alltoall); the "
                                       "others give the same results")),
    "--moe-permute-fusion": (0, "mp sorts the tokens by expert with torch's own kernels"),
    "--moe-router-fusion": (0, "mp's router takes its top k and softmax with torch's own "
                               "kernels"),
    "--moe-use-legacy-grouped-gemm": (0, ("mp has one grouped GEMM for the experts, torch's "
                                          "(--moe-grouped-gemm)")),
    "--moe-shared-expert-overlap": (0, ("mp runs the shared experts before the routed ones, "
                                        "not beside their token exchange; the results are "
                                        "the same")),
    "--overlap-moe-expert-parallel-comm": (0, _EP_OVERLAP),
    "--delay-wgrad-compute": (0, _EP_OVERLAP),
    "--moe-pad-expert-input-to-capacity": (0, ("mp sizes each layer's exchanges by the counts "
                                              "it routed; padding with unrouted copies changes "
                                              "no result")),
    "--overlap-cpu-optimizer-d2h-h2d": (0, ("mp's --optimizer-cpu-offload copies gradients to "
                                            "the host and masters back on the current stream, "
                                            "around the host step")),
    "--use-torch-optimizer-for-cpu-offload": (0, ("mp's --optimizer-cpu-offload always steps "
                                                  "with torch's optimizer on the host")),
    "--no-pin-cpu-grads": (0, "mp pins its host gradients when CUDA is there"),
    "--no-pin-cpu-params": (0, "mp pins its host masters when CUDA is there"),
    "--local-rank": (1, ("mp reads the local rank from LOCAL_RANK, which torchrun (and "
                         "torch.distributed.launch) sets")),
    "--no-async-tensor-model-parallel-allreduce": (0, _DEPRECATED),
    "--dist-ckpt-format": (1, _DEPRECATED + " for --ckpt-format; mp writes one format"),
    "--no-ckpt-fully-parallel-save": (0, _DCP),
    "--ckpt-assume-constant-structure": (0, ("it lets Megatron reuse a save plan between "
                                             "saves; mp plans each save anew and writes the "
                                             "same files")),
    "--use-persistent-ckpt-worker": (0, ("mp's --async-save writes from a background thread; "
                                         "it has no worker process to keep")),
    "--dist-ckpt-save-pre-mcore-014": (0, ("mp writes its own checkpoint format, not "
                                           "Megatron-Core's, so there is no older layout to "
                                           "keep")),
    "--dist-ckpt-optim-fully-reshardable": (0, _ANY_LAYOUT),
    "--distrib-optim-fully-reshardable-mem-efficient": (0, _ANY_LAYOUT),
    "--tp-comm-overlap-cfg": (1, _TP_OVERLAP),
    "--tp-comm-overlap-rs-dgrad": (0, _TP_OVERLAP),
    "--tp-comm-bootstrap-backend": (1, _TP_OVERLAP),
    **dict.fromkeys(("--disable-tp-comm-overlap-ag", "--disable-tp-comm-overlap-rs",
                     "--disable-tp-comm-bulk-dgrad", "--disable-tp-comm-bulk-wgrad",
                     "--disable-tp-comm-split-ag", "--disable-tp-comm-split-rs"),
                    (0, _TP_OVERLAP)),
    "--timing-log-option": (1, _TIMING),
    "--no-barrier-with-level-1-timing": (0, _TIMING),
    "--no-log-loss-scale-to-tensorboard": (0, ("TensorBoard always gets the loss scale "
                                              "(loss-scale); mp has no switch to leave it out")),
    "--use-te-activation-func": (0, ("it picks Transformer Engine's activation kernels; mp "
                                     "computes its activations with torch's ops")),
    "--no-gradient-reduce-div-fusion": (0, ("mp scales the gradients by 1/DP before it reduces "
                                            "them, as Megatron does with this flag")),
    "--use-fused-weighted-squared-relu": (0, ("it picks a fused kernel for the experts' "
                                              "squared ReLU times their routing weights; mp "
                                              "has no such kernel")),
    "--no-clone-scatter-output-in-embedding": (0, ("it saves Megatron a copy of the "
                                                   "sequence-parallel embedding output; mp "
                                                   "makes no such copy")),
    "--no-scatter-gather-tensors-in-pipeline": (0, ("mp's pipeline sends each activation "
                                                    "whole")),
    "--no-align-grad-reduce": (0, ("it changes when each pipeline stage starts its gradient "
                                   "reductions, not what they compute")),
    "--no-align-param-gather": (0, ("it changes when each pipeline stage starts its parameter "
                                    "all-gathers, not what they gather")),
    "--high-priority-stream-groups": (None, ("mp runs each collective on its group's default "
                                             "stream; stream priorities change timing only")),
    "--enable-experimental": (0, "mp has no experimental features behind a switch"),
    "--legacy-tokenizer": (0, ("mp's tokenizers are its own (mp.data.tokenizer), not "
                               "Megatron's legacy or new ones")),
    "--no-use-tokenizer-model-from-checkpoint-args": (0, ("mp's --use-checkpoint-args takes "
                                                          "the model's arguments only, never "
                                                          "the tokenizer")),
    "--no-initialization": (0, ("mp always initializes the weights (a --load then overwrites "
                                "them); Megatron skips it to start faster")),
    "--log-straggler": (0, _STRAGGLER),
    "--disable-straggler-on-startup": (0, _STRAGGLER),
    "--straggler-ctrlr-port": (1, _STRAGGLER),
    "--straggler-minmax-count": (1, _STRAGGLER),
    "--run-workload-inspector-server": (0, ("mp has no workload inspector server; --profile "
                                            "traces chosen steps with torch.profiler")),
    "--no-one-logger": (0, _ONE_LOGGER),
    "--one-logger-project": (1, _ONE_LOGGER),
    "--one-logger-run-name": (1, _ONE_LOGGER),
    "--one-logger-async": (0, _ONE_LOGGER),
    "--app-tag-run-name": (1, _ONE_LOGGER),
    "--app-tag-run-version": (1, _ONE_LOGGER),
    "--enable-ft-package": (0, _FT),
    "--calc-ft-timeouts": (0, _FT),
    "--log-energy": (0, "mp does not read the GPUs' energy counters"),
    "--logging-level": (1, "mp prints its messages itself; it has no logger levels to set"),
    "--ddp-average-in-collective": (0, ("mp scales the gradients by 1/DP before it sums them "
                                        "over the data-parallel ranks: the same mean as "
                                        "averaging in the collective")),
    **dict.fromkeys(("--fp8-margin", "--fp8-interval", "--fp8-amax-history-len",
                     "--fp8-amax-compute-algo"), (1, _DELAYED)),
    "--defer-embedding-wgrad-compute": (0, _WGRAD_DEFERRAL),
    "--wgrad-deferral-limit": (1, _WGRAD_DEFERRAL),
}

#: Megatron-LM flags of features mp does not have -> what to say when one is given
#: (`UNSUPPORTED_PREFIXES` covers whole families of them).
_FSDP = ("mp has no Megatron FSDP (--use-megatron-fsdp); --use-torch-fsdp2 shards parameters, "
         "gradients and optimizer state with PyTorch's FSDP2, --use-distributed-optimizer the "
         "optimizer state")
_FP8 = ("mp's FP8 is --fp8-format e4m3|hybrid with --fp8-recipe tensorwise (the transformer "
        "layers' linears, each operand scaled by its own amax); it keeps no FP8 parameters "
        "and gathers none")
_RERUN = ("mp has no re-run engine: it never re-runs an iteration to check its result (a "
          "non-finite loss stops a bf16/fp32 run)")
_NVRX = ("mp has no local (NVRx) checkpoints; --save writes torch.distributed.checkpoint "
         "directories")
_FABRIC = ("mp's collectives are plain torch.distributed ones (NCCL with CUDA, gloo on the "
           "CPU), with no fabric-specific options")
_MAMBA = ("mp has no Mamba layers (Megatron's hybrid models): its layers are attention "
          "with an MLP or experts")
_CONVERT = ("mp writes one checkpoint format; tools/convert_checkpoint.py converts Megatron-Core "
            "and Hugging Face checkpoints")


def _renamed(new: str) -> str:
    return f"Megatron-LM refuses this old flag too: use {new}"


UNSUPPORTED_FLAGS: dict[str, str] = {
    **dict.fromkeys(("--use-megatron-fsdp", "--use-custom-fsdp",
                     "--fsdp-double-buffer", "--suggested-communication-unit-size",
                     "--enable-full-sharding-in-hsdp",
                     "--init-model-with-meta-device", "--no-strict-fsdp-dtensor-load"), _FSDP),
    **dict.fromkeys(("--reuse-grad-buf-for-mxfp8-param-ag", "--keep-fp8-transpose-cache"),
                    _FP8),
    "--batch-size": _renamed("--micro-batch-size"),
    "--warmup": _renamed("--lr-warmup-iters, --lr-warmup-samples or --lr-warmup-fraction"),
    "--model-parallel-size": _renamed("--tensor-model-parallel-size"),
    "--checkpoint-activations": _renamed("--recompute-activations (selective), or "
                                         "--recompute-granularity full with --recompute-method"),
    "--yaml-cfg": "mp reads a YAML config with --config PATH (mp's own keys: see --help)",
    **dict.fromkeys(("--ckpt-convert-format", "--ckpt-convert-save",
                     "--ckpt-convert-update-legacy-dist-opt-format"), _CONVERT),
    **dict.fromkeys(("--non-persistent-local-ckpt-dir", "--non-persistent-local-ckpt-algo",
                     "--replication", "--replication-jump", "--replication-factor"), _NVRX),
    **dict.fromkeys(("--use-nccl-ub", "--disable-symmetric-registration", "--use-sharp",
                     "--sharp-enabled-group", "--use-ring-exchange-p2p"), _FABRIC),
    "--lazy-mpu-init": ("mp's job makes its process groups itself; it has no deferred start "
                        "for an outside DDP manager"),
    **dict.fromkeys(("--enable-cuda-graph", "--external-cuda-graph", "--te-rng-tracker"),
                    "mp has no CUDA graphs for training; --model.compile_layers compiles each "
                    "layer with torch.compile instead"),
    **dict.fromkeys(("--check-for-spiky-loss", "--check-for-large-grads",
                     "--error-injection-rate", "--error-injection-type",
                     "--result-rejected-tracker-filename"), _RERUN),
    "--dump-param-to-param-group-map": ("mp builds its optimizer's parameter groups itself "
                                        "(decay, no decay, --decoupled-lr)"),
    "--test-mode": "mp has no tests that run alongside training",
    "--config-logger-dir": ("mp prints the whole resolved config at the start of a job instead "
                            "(read back with --config)"),
    "--tokenizer-metadata": ("mp's tokenizers take --tokenizer-type and their files only "
                             "(docs/training.md)"),
    "--apply-residual-connection-post-layernorm": ("mp's layers add the residual from before "
                                                   "the norm (pre-norm, Megatron's default)"),
    "--use-legacy-models": "mp has one GPT, laid out as Megatron-Core's; drop the flag",
    "--moe-extended-tp": ("Megatron-LM deprecated it for --expert-tensor-parallel-size, which "
                          "mp takes (1: whole experts; default: split over TP)"),
    "--is-hybrid-model": _MAMBA,
}
#: Flag-name prefixes of Megatron-LM feature families mp does not have -> what to say.
UNSUPPORTED_PREFIXES: dict[str, str] = {
    "--fp8": _FP8,
    "--fp4": "mp has no FP4 training (Transformer Engine); use --bf16",
    "--cuda-graph-": ("mp has no CUDA graphs for training; --model.compile_layers compiles each "
                      "layer with torch.compile instead"),
    "--muon-": ("mp's Muon has no such option: it has --muon-momentum, --muon-use-nesterov, "
                "--muon-num-ns-steps, --muon-coefficient-type, --muon-scale-mode, "
                "--muon-extra-scale-factor, --muon-fp32-matmul-prec, --muon-tp-mode, "
                "--muon-no-split-qkv (docs/training.md)"),
    "--heterogeneous-layers-": "mp's layers all have the same shape (one per model config)",
    "--hybrid-": _MAMBA,
    "--mamba-": _MAMBA,
    "--inprocess-": ("mp has no in-process restart (nvidia-resiliency-ext): a failed job stops, "
                     "and --save / --load resume it"),
    "--moe-": ("mp's mixture of experts has no such option: it has --num-experts, "
               "--moe-router-topk, --moe-ffn-hidden-size, --moe-layer-freq, "
               "--moe-router-pre-softmax, "
               "--moe-router-load-balancing-type aux_loss|seq_aux_loss|global_aux_loss|none, "
               "--moe-aux-loss-coeff, --moe-z-loss-coeff, "
               "--moe-shared-expert-intermediate-size, --moe-shared-expert-gate, "
               "--moe-router-dtype, "
               "--moe-router-score-function softmax|sigmoid, --moe-router-topk-scaling-factor, "
               "--moe-router-enable-expert-bias, --moe-router-bias-update-rate, "
               "--moe-expert-capacity-factor, --moe-token-drop-policy probs|position, "
               "--moe-router-num-groups, --moe-router-group-topk, "
               "--moe-router-topk-limited-devices, "
               "--moe-input-jitter-eps, --moe-router-force-load-balancing, "
               "--moe-apply-probs-on-input, --moe-layer-recompute, --moe-per-layer-logging, "
               "--moe-grouped-gemm, --expert-model-parallel-size (top-k routing, "
               "docs/training.md)"),
}
#: Megatron-LM flags that take values of which mp has some -> (the values mp has, why).
CHOICE_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "--rerun-mode": (("disabled",), _RERUN),
    "--data-parallel-sharding-strategy": (("no_shard",), _FSDP),
    "--pipeline-model-parallel-comm-backend": (("nccl",), _FABRIC),
    "--spec": (("local",), ("mp builds Megatron's local layers (--spec local); it takes no "
                            "spec module")),
    "--mid-level-dataset-surplus": (("0.005",), ("mp builds each blend member with Megatron's "
                                                 "default surplus of 0.005 "
                                                 "(mp.data.dataset_builder)")),
}
