"""Components every training recipe stands on (torchtune's ``training/``): SFT (``tsrec.sft.loop``), RL
(``tsrec.rl.loop``) and each Ray Tune trial (an SFT run) call these; no recipe imports another.

- :mod:`~tsrec.train.distributed`: process group under torchrun and Ray Train, the rank's device (from the
  run context, never from ``torch.cuda.is_available()``), ``all_sum``;
- :mod:`~tsrec.train.engine`: ``EngineSpec`` -> DeepSpeed dict, model loading (ZeRO-3 partitioned), LoRA,
  the engine with its optimizer and LR schedule;
- :mod:`~tsrec.train.schedule`: the LR schedule (warm-up, then linear / cosine / constant);
- :mod:`~tsrec.train.checkpoint`: run identity, checkpoint save/resume, Hugging Face export;
- :mod:`~tsrec.train.ranking`: the valid ranking probe (constrained beam search, HR/NDCG@K);
- :mod:`~tsrec.train.sampling`: each rank's share of a step's samples;
- :mod:`~tsrec.train.faults`: the fault-injection hook of the resume tests;
- :mod:`~tsrec.train.metrics`: ``metrics.csv`` and TensorBoard.

Pure torch / DeepSpeed: nothing here imports Ray (``tests/test_layering.py``).
"""
