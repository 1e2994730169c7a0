"""The pretraining loop and what it reports.

- `mp.training.pretrain`: ``pretrain(cfg)`` (seeds, model, optimizer, data, loop),
  ``set_random_seed``, ``setup_model_and_optimizer``;
- `mp.training.training`: ``train_step``, ``evaluate``, ``train``, ``TrainState``;
- `mp.training.gpt_step`: the GPT ``forward_step`` and ``loss_func`` the schedules call;
- `mp.training.data`: ``build_data_iterators``;
- `mp.training.flops`: ``num_floating_point_operations``, ``peak_tflops``;
- `mp.training.logger` and `mp.training.progress`: the log line, TensorBoard, the progress bar.

Import from the modules (importing this package loads nothing).
"""
