"""The data pipeline: tokenizers, Megatron ``.bin``/``.idx`` datasets, GPT samples, loaders.

Import from the modules (importing this package loads nothing):

- `mp.data.tokenizer`: ``build_tokenizer``, ``vocab_size_with_padding`` and the tokenizers.
- `mp.data.indexed_dataset`: ``IndexedDataset`` / ``IndexedDatasetBuilder`` (Megatron's format).
- `mp.data.preprocess`: ``preprocess_files`` (the engine of ``tools/preprocess_data.py``).
- `mp.data.gpt_dataset`: ``GPTDataset`` and its index builders.
- `mp.data.blended_dataset`: ``BlendedDataset``.
- `mp.data.dataset_builder`: ``build_gpt_datasets(data_path, split, ...)`` -> train/valid/test.
- `mp.data.samplers`: ``MegatronPretrainingSampler``, ``build_pretraining_data_loader``.
- `mp.data.corpus`: ``prepare_default_corpus`` (the embedded standard-library corpus).
- `mp.data.conversations`, `mp.data.prompt_formats`, `mp.data.sft_dataset`: supervised
  fine-tuning (``--sft``): conversation files, how a conversation becomes ids and a loss mask,
  the packed samples; ``build_sft_datasets`` in `mp.data.dataset_builder`;
  `mp.data.conversation_corpus`: conversations made from the embedded corpus.
- `mp.data.cache`: atomic writes and the build-once-then-share collective.
"""
