"""GPT split into pipeline stages (and virtual stages) for this rank.

With ``p`` pipeline stages and ``v`` virtual stages (model chunks) per rank, the ``L`` layers
are cut into ``p * v`` chunks of consecutive layers, ``L / (p * v)`` each unless the config
splits them unevenly (`mp.model.pipeline_split`). Chunk ``c`` of stage ``r`` holds global chunk
``c * p + r`` (Narayanan et al. 2021's interleaved assignment; ``v = 1`` gives each stage one
contiguous block). The embedding lives on the first chunk of stage 0, the final norm, output
layer and loss on the last chunk of stage ``p - 1``.

Tied word embeddings across stages: the last stage holds its own copy of the embedding matrix
as the output layer's weight. It starts as the first stage's (zeros, then a sum over the
embedding group) and stays equal because both copies are marked ``embedding_group_sync`` and
their gradients are summed over that group every step
(`mp.distributed.finalize_model_grads`). The last stage's copy is marked ``shared = True`` so
that norms and counts take the matrix once. Multi-token prediction (`mp.model.mtp`) reads the
word embedding on the last stage: its copy is kept the same way, tied or not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mp import parallel_state
from mp.model.config import TransformerConfig
from mp.model.gpt import GPTModel


def build_gpt_chunks(config: TransformerConfig, group=None) -> list[GPTModel]:
    """This rank's model chunks (one without virtual stages), built in order."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp != config.pipeline_model_parallel_size:
        raise ValueError(f"config.pipeline_model_parallel_size="
                         f"{config.pipeline_model_parallel_size} but the pipeline group has "
                         f"{pp} ranks")
    rank = parallel_state.get_pipeline_model_parallel_rank()
    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = [GPTModel(config, pre_process=rank == 0 and c == 0,
                       post_process=rank == pp - 1 and c == vpp - 1,
                       layers=config.chunk_layers(rank, c), group=group)
              for c in range(vpp)]
    initialize_word_embeddings(chunks)
    return chunks


def _shared_weight(chunks: list[GPTModel]) -> torch.Tensor | None:
    """The embedding matrix this rank holds as part of the pair kept equal over the first
    and last stages (tied embeddings, or multi-token prediction's copy), if any."""
    for chunk in chunks:
        pair = chunk.share_embeddings or chunk.config.mtp_num_layers is not None
        if pair and (chunk.pre_process or chunk.post_process):
            return chunk.shared_embedding_or_output_weight()
    return None


@torch.no_grad()
def initialize_word_embeddings(chunks: list[GPTModel]) -> None:
    """Make the last stage's copy of the embedding equal to the first stage's."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    weight = _shared_weight(chunks)
    if weight is None:
        return
    if not parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        weight.zero_()
        weight.shared = True
    weight.embedding_group_sync = True
    dist.all_reduce(weight.data, group=parallel_state.get_embedding_group())
