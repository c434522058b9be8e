"""The batch and chunk sizes the pipeline allocates by, in one torch-free place, so ``quant_core.plan`` counts
exactly what evaluation, learning and GPTQ hold (the API host imports plan without torch)."""

from __future__ import annotations

EVAL_BATCH_TOKENS = 4096  # tokens per evaluation forward (evaluate.perplexity); 8192 put the quantized evaluation of
# SmolLM2-135M at 2.99x the model (its R4 and quantizer buffers scale with it), and was no faster on the CPU
# logits per vocabulary chunk, 8 MiB in float32 (losses): 32 MiB chunks raised a SmolLM2 learning step's peak RSS by
# 0.2 GB; on a GPU the lm_head's FLOPs are the same, only the calls more
LOGIT_CHUNK_ELEMS = 1 << 21
HEAD_LOSS_CHUNKS = 3  # float32 chunks the fused learning loss holds at its peak: log p, log q, q (losses)
GPTQ_MICRO_BATCH = 8  # calibration windows per forward in GPTQ (convert.quantize_weights)
PREFIT_TOKENS = 1024  # tokens sampled per layer and site for the R1 pre-fit (prefit)
PREFIT_BATCH = 8192  # sampled rows per pre-fit step (prefit)
PREFIT_CHUNK_ROWS = 2048  # of those, rows per backward (the gradient is accumulated; prefit)
PREFIT_CHUNK_LAYERS = 8  # layers per backward of the R2 pre-fit error (prefit)
PREFIT_HEAD_TOKENS = 256  # sampled tokens per layer and pre-fit step for the R2s (their V heads, o_proj input)
ROW_CHUNK = 4096  # vocabulary rows per float64 step on the embedding and lm_head (rotation)
