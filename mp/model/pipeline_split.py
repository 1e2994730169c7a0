"""How the transformer layers are cut into pipeline chunks, evenly or not (Megatron's rules).

With ``p`` pipeline stages and ``v`` model chunks per stage (virtual stages), global chunk
``g = c * p + r`` is chunk ``c`` of stage ``r`` (Narayanan et al. 2021's interleaved order;
``v = 1`` gives each stage one block). The layers fill the global chunks in that order, so a
chunk's first layer is the count of every chunk before it. How many each chunk gets:

- **even** (the default): ``L / (p v)`` each.
- **first/last stage given** (Megatron's ``--decoder-first-pipeline-num-layers F`` and
  ``--decoder-last-pipeline-num-layers E``): stage 0 has ``F`` layers and/or stage ``p - 1``
  has ``E``; the rest are spread evenly over the other ("middle") stages. Each stage's layers
  are spread evenly over its ``v`` chunks, so ``F``, ``E`` and every middle stage's count must
  divide by ``v``.
- **embedding or loss counted as a layer** (``--account-for-embedding-in-pipeline-split``,
  ``--account-for-loss-in-pipeline-split``): the split is even over ``L + 1`` (or ``L + 2``)
  "layers", and the model's first chunk (last chunk) has one transformer layer fewer, its
  share going to the embedding (the output layer and loss).
- **a layout** (``--pipeline-model-parallel-layout``, `parse_layout`): every chunk written
  out, in global-chunk order, as Megatron's string: ``|`` ends a chunk, ``t`` is a transformer
  layer, ``E`` the embedding (opening the first chunk), ``L`` the loss (closing the last),
  ``x*n`` and ``(...)*n`` repeat, commas are cosmetic. ``"Et*3|(tt|)*6,tL"`` at PP 4 is 8
  chunks, 2 per stage: 3 layers, then 2 in each chunk up to the last, which holds 1 and the
  loss (16 layers). The number of chunks gives the virtual stages per rank.

Only the model's first chunk (which holds the embedding) and its last (the output layer and
loss) may be left without layers: any other chunk would hold nothing at all. Every rule is
checked with a message naming the values, before any process group exists.
"""

from __future__ import annotations

import functools
import re

#: The `TransformerConfig` fields that split the layers unevenly, and their values for an even
#: split (what a model has once it is not pipelined).
UNEVEN_SPLIT_FIELDS = {"num_layers_in_first_pipeline_stage": None,
                       "num_layers_in_last_pipeline_stage": None,
                       "account_for_embedding_in_pipeline_split": False,
                       "account_for_loss_in_pipeline_split": False,
                       "pipeline_model_parallel_layout": None}


@functools.lru_cache(maxsize=1024)  # asked for per layer by the estimator's planner
def chunk_layer_counts(num_layers: int, pp: int, vpp: int | None = None,
                       first: int | None = None, last: int | None = None,
                       account_for_embedding: bool = False, account_for_loss: bool = False,
                       layout: str | None = None) -> tuple[tuple[int, ...], ...]:
    """``counts[r][c]``: transformer layers of chunk ``c`` on pipeline stage ``r``."""
    v = vpp or 1
    ways = [name for name, given in (
        ("num_layers_in_first/last_pipeline_stage", first is not None or last is not None),
        ("account_for_embedding/loss_in_pipeline_split", account_for_embedding or account_for_loss),
        ("pipeline_model_parallel_layout", layout is not None)) if given]
    if len(ways) > 1:
        raise ValueError(f"{' and '.join(ways)} are ways to split the layers unevenly; set one "
                         "of them")
    if layout is not None:
        counts = _layout_split(layout, num_layers, pp, v)
    elif first is not None or last is not None:
        counts = _first_last_split(num_layers, pp, v, first, last)
    else:
        counts = _even_split(num_layers, pp, v, account_for_embedding, account_for_loss)
    empty = [(r, c) for r in range(pp) for c in range(v)
             if not counts[r][c] and (r, c) not in ((0, 0), (pp - 1, v - 1))]
    if empty:
        r, c = empty[0]
        raise ValueError(
            f"this split of num_layers={num_layers} leaves chunk {c} of pipeline stage {r} "
            f"without layers (layers per stage and chunk: {[list(s) for s in counts]}); only "
            "the model's first chunk (the embedding) and last chunk (the loss) may be empty")
    return counts


def _even_split(num_layers: int, pp: int, v: int, account_for_embedding: bool,
                account_for_loss: bool) -> tuple[tuple[int, ...], ...]:
    total = num_layers + account_for_embedding + account_for_loss
    if total % (pp * v):
        extra = "".join(f" + 1 ({name})" for name, on in (
            ("the embedding", account_for_embedding), ("the loss", account_for_loss)) if on)
        raise ValueError(
            f"num_layers={num_layers}{extra} is not divisible by pipeline_model_parallel_size x "
            f"virtual_pipeline_model_parallel_size={pp * v}; give the first or last stage its "
            "own count (num_layers_in_first/last_pipeline_stage) to split them unevenly")
    counts = [[total // (pp * v)] * v for _ in range(pp)]
    counts[0][0] -= account_for_embedding
    counts[-1][-1] -= account_for_loss
    return tuple(tuple(stage) for stage in counts)


def _first_last_split(num_layers: int, pp: int, v: int, first: int | None,
                      last: int | None) -> tuple[tuple[int, ...], ...]:
    if pp < 2:
        raise ValueError("num_layers_in_first/last_pipeline_stage need "
                         f"pipeline_model_parallel_size > 1, got {pp}")
    given = {"num_layers_in_first_pipeline_stage": first,
             "num_layers_in_last_pipeline_stage": last}
    for name, count in given.items():
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)
                                  or count < 0 or count % v):
            raise ValueError(f"{name}={count!r} must be a non-negative integer divisible by "
                             f"virtual_pipeline_model_parallel_size={v}")
    middle_stages = pp - sum(count is not None for count in given.values())
    middle_layers = num_layers - (first or 0) - (last or 0)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers) or (
            middle_stages and middle_layers % (middle_stages * v)):
        raise ValueError(
            f"num_layers={num_layers} minus num_layers_in_first_pipeline_stage={first} and "
            f"num_layers_in_last_pipeline_stage={last} leaves {middle_layers} layers for the "
            f"{middle_stages} other stages x virtual_pipeline_model_parallel_size={v} chunks: "
            "it must be a non-negative multiple of that (0 when no stage is left)")
    per_middle = middle_layers // (middle_stages * v) if middle_stages else 0
    counts = [[per_middle] * v for _ in range(pp)]
    if first is not None:
        counts[0] = [first // v] * v
    if last is not None:
        counts[-1] = [last // v] * v
    return tuple(tuple(stage) for stage in counts)


def parse_layout(layout: str) -> list[str]:
    """The chunks of a layout string (module doc), its repetitions written out:
    ``"Et*2|(t|)*2,tL"`` is ``["Ett", "t", "t", "tL"]``. ValueError for anything else."""
    text = layout.replace(",", "").replace(" ", "")
    while True:  # innermost groups first
        expanded = re.sub(r"\(([^()]*)\)\*(\d+)", lambda m: m[1] * int(m[2]), text)
        if expanded == text:
            break
        text = expanded
    text = re.sub(r"([EtmL|])\*(\d+)", lambda m: m[1] * int(m[2]), text)
    if "m" in text:
        raise ValueError(f"pipeline_model_parallel_layout={layout!r} places multi-token "
                         "prediction layers (m), which mp does not have")
    if re.search(r"[^EtL|]", text):
        raise ValueError(f"pipeline_model_parallel_layout={layout!r}: only E, t, L, |, "
                         "repetitions (x*n, (...)*n) and commas are understood")
    return text.split("|")


def _layout_split(layout: str, num_layers: int, pp: int, v: int
                  ) -> tuple[tuple[int, ...], ...]:
    chunks = parse_layout(layout)
    where = f"pipeline_model_parallel_layout={layout!r}"
    if len(chunks) != pp * v:
        raise ValueError(f"{where} has {len(chunks)} chunks; pipeline_model_parallel_size x "
                         f"virtual_pipeline_model_parallel_size = {pp} x {v} = {pp * v}")
    text = "|".join(chunks)
    if not (chunks[0].startswith("E") and chunks[-1].endswith("L")
            and text.count("E") == text.count("L") == 1):
        raise ValueError(f"{where}: E must open the first chunk and L close the last, once "
                         "each (mp keeps the embedding on the first chunk and the loss on the "
                         "last)")
    if text.count("t") != num_layers:
        raise ValueError(f"{where} holds {text.count('t')} transformer layers (t) but "
                         f"num_layers={num_layers}")
    return tuple(tuple(chunks[c * pp + r].count("t") for c in range(v)) for r in range(pp))


@functools.lru_cache(maxsize=4096)
def chunk_layer_range(counts: tuple[tuple[int, ...], ...], pp_rank: int, chunk: int) -> range:
    """0-based indices, over the whole model, of the layers of ``chunk`` on ``pp_rank``."""
    pp = len(counts)
    start = sum(counts[g % pp][g // pp] for g in range(chunk * pp + pp_rank))
    return range(start, start + counts[pp_rank][chunk])


def uneven_stages_text(counts: tuple[tuple[int, ...], ...]) -> str:
    """``layers 1+3+3+1`` (each stage's layers) when the stages hold unequal numbers, else
    ``""``."""
    layers = [sum(stage) for stage in counts]
    return "" if len(set(layers)) == 1 else f"layers {'+'.join(map(str, layers))}"
