"""From one micro-batch's ``loss_func`` output to what its backward starts from (the tail of
Megatron-Core's schedule ``forward_step``), shared by every schedule.

``loss_func(output_tensor)`` returns either ``(loss, reported)``, the micro-batch's loss already
averaged, or, as Megatron's GPT step does (`mp.training.gpt_step`), ``(loss_sum, num_tokens,
reported)``: the sum of the per-token losses its mask keeps and how many tokens that is.
``reported`` maps names to what the training loop averages
(`mp.training.evaluation.average_losses`).

By default backward starts from the micro-batch's mean loss divided by the number of
micro-batches ``m``, so that the gradients accumulate to the mean over micro-batches (and
`mp.distributed.DistributedDataParallel` averages them over the data-parallel ranks). A
micro-batch whose mask keeps no token (fine-tuning samples cut before the assistant speaks)
backpropagates 0 and is left out of the reported mean, where Megatron's would be NaN. With
``calculate_per_token_loss`` (Megatron's ``--calculate-per-token-loss``) it starts from the sum
itself; the schedule adds the micro-batches' token counts up and
`mp.distributed.finalize_model_grads` divides the gradients by the global batch's count. The
step then minimises (sum of every kept token's loss) / (number of kept tokens) over the whole
global batch, which differs from the mean of micro-batch means when the loss masks keep
unequal numbers of tokens.

Mixture-of-experts layers and multi-token prediction add auxiliary losses in backward
(`mp.model.aux_losses`); `scale_aux_losses` gives them, before an iteration's forwards, the
factor each micro-batch's loss backpropagates with: ``loss scale / m``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mp.model.aux_losses import set_aux_loss_scale


def scale_aux_losses(num_microbatches: int, grad_scale_func: Callable | None) -> None:
    """Make the coming forwards' auxiliary losses backpropagate with ``loss scale / m``
    (``grad_scale_func``: the optimizer's ``scale_loss``, None for scale 1)."""
    scale = 1.0 if grad_scale_func is None else float(grad_scale_func(torch.ones(())))
    set_aux_loss_scale(scale / num_microbatches)


def microbatch_loss(outputs: tuple, num_microbatches: int, forward_data_store: list[dict],
                    calculate_per_token_loss: bool) -> tuple[torch.Tensor, torch.Tensor | int]:
    """``(scalar to backpropagate, token count)`` from ``loss_func``'s ``outputs`` (the count
    is 0 for a loss_func that returns a mean); appends ``reported`` to ``forward_data_store``."""
    if len(outputs) == 3:
        loss, num_tokens, reported = outputs
        if not calculate_per_token_loss:  # no kept token: 0, where Megatron divides by 0
            loss = loss / torch.as_tensor(num_tokens).clamp(min=1) / num_microbatches
    elif calculate_per_token_loss:
        raise ValueError("calculate_per_token_loss=True needs a loss_func that returns "
                         f"(loss sum, token count, reported); this one returned {len(outputs)} "
                         "values")
    else:
        (loss, reported), num_tokens = outputs, 0
        loss = loss / num_microbatches
    forward_data_store.append(reported)
    return loss, num_tokens
