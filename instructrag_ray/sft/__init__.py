"""InstructRAG-FT: supervised fine-tuning on the synthesized rationales (Ray Train + DeepSpeed ZeRO).

    rationale Parquet -> select (consistent rows) -> build examples -> one fixed order
        -> TorchTrainer: `train_loop_per_worker` on every worker (DeepSpeed engine; its shard from
           `ray.train.get_dataset_shard`; checkpoints through `ray.train.report`)
        -> <output>/model/ (Hugging Face format)

An example is PAPER.md's FT prompt (documents + question, `prompts.ft_parts`) as the user turn and the
rationale as the assistant turn, both rendered by the model's own chat template. The target is the
rendered assistant turn (the rationale and the template's end-of-turn token); every other token has
label -100. When prompt + target exceed `data.max_length`, document tokens are cut from the left
(`prompts.render`, the same rule as synthesis: lowest-ranked documents first, question kept); a target
that alone does not fit is not trained on and goes to rejected/ with reason `target_too_long`.

Modules, in data-flow order: `examples` (rationale rows -> token ids and labels), `packing` (padded or
packed micro-batches, per-example attention, losses), `loop` (the schedule, DeepSpeed's config and
`train_loop_per_worker`, checkpoints and export), `job` (jobs/train.py: the driver).

Layout of an output directory:
    checkpoints/step_XXXXXXXX/   DeepSpeed checkpoints (weights, optimizer, scheduler, step, data
                                 position), written and pruned by Ray Train
    metrics.jsonl                one line per logging step: loss, lr, tokens/s (and GPU memory)
    rejected/part-*.parquet      examples that cannot be trained on (schemas/rejected.json, stage train)
    model/                       the fine-tuned model with tokenizer and generation config
    run.json                     this output's settings fingerprint: a rerun with other settings is refused
    manifest.json                written last: counts, steps, loss, timings

Resume. The data order is a pure function of the input and the config: rows keep their input order
(Ray Data `preserve_order`), are re-blocked into fixed-size blocks, split over the workers in order,
and every worker shuffles its shard with a buffer seeded by (seed, epoch). A checkpoint stores the
global step and the data position (epoch, steps done in it) with the DeepSpeed state; a rerun into
the same output, or Ray Train restarting a failed worker group (`max_failures`), loads the latest
checkpoint and skips exactly the batches already trained on.

Loss. One optimizer step covers `optim.global_batch_size` examples: each worker runs `gradient
accumulation` micro-batches of `optim.micro_batch_size`. The loss is the mean over every target token
of the step (the token count is all-reduced first), so it does not depend on how examples are laid
out in micro-batches; with `data.packing` a micro-batch's examples are concatenated into one row
without padding (position ids restart per example and attention stays within each example: varlen
flash attention when named, else per-example sdpa) and the loss and gradient are the same as padded.
"""

