"""Attention kernels behind `g2vlm_jax.model.attention.attention` (which one runs is decided there).

- `blockwise`: flash-style online softmax over key blocks in pure JAX; memory linear in the row
  length, skips (query block, key block) pairs the mask rule fully forbids. Runs on every backend.
- `tpu_flash`: Pallas (Mosaic) flash attention for TPUs with the same rule evaluated per tile in
  VMEM; dead tiles skip their matmuls and K/V copies.
- `cudnn`: cuDNN fused attention through `jax.nn.dot_product_attention` with the packed-row mask
  given as a dense additive bias (GPU, bf16/fp16 only).
- `full_rows`: not a mask kernel: the encoders' and Pi3 decoders' attention, where every pair is allowed,
  in tiles of whole key rows (`encoder_layers.attention` on CPU, and on GPUs outside cuDNN's rules).
"""
