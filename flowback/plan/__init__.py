"""The memory plan: per-GPU peak memory of every stage, measured on the real code before any work.

Each number comes from running the stage's own code - the real model, the real training step (step inputs, alignment
targets, the objective, backward, clipping, AdamW, EMA), the real denoising and classifier passes - on fake tensors
(torch's FakeTensorMode: shapes and dtypes, no data, no GPU needed) while counting the bytes of every live tensor
storage (`LiveBytes`): everything a rank holds is on that path (weights, optimizer state, EMA, the encoder and its
targets, the batch, gradients held across accumulation, DDP's gradient buffer). What fake tensors cannot see - cuBLAS
and attention workspaces, the CUDA context, NCCL's buffers - is added as documented allowances, and the sum must stay
under a margin of the budget (`runtime.gpu_memory_gib`): budget.py. FLOPs are counted on the same pass (the
formulas of torch's flop counter; causal attention as executed).

The plan chooses, per run:
- train: the largest micro-batch (a divisor of the per-rank batch; the rest is gradient accumulation, so the global
  batch never changes) that fits without activation checkpointing, as long as it is at least `EFFICIENT_MICRO`
  images; otherwise per-layer checkpointing and the largest micro-batch that fits with it;
- sample: the largest micro-batch (chunk, chunk/2, ...) for the reverse pass and the denoising gradient;
- classifier: the largest batch for the training-free classifier's backward pass;
- encode (latent profiles): the VAE's encode batch is checked, not chosen.
A run that does not fit even at micro-batch 1 with checkpointing is an error naming the experiment.
`python -m flowback plan` prints the table; the stages call the same `resolve_*` functions when a value is `auto`.

Modules: measure.py (counting bytes and FLOPs under fake tensors; the memo and choice helpers), budget.py (the
allowances and the margin), ddp.py (DDP's gradient memory without a process group), train.py, sample.py,
classifier.py (each stage's measurement, choice and the `resolve_*` its stage calls; per family: `plan_flow_train`,
`plan_af_train`), prefetch.py (distinct configurations measured in parallel), table.py (`flowback plan`).
The package imports nothing itself, so a stage depends only on the planning code it uses.
"""
