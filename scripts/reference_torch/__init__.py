"""The PyTorch reference of the study: what lgeo_jax is benchmarked against.

The study written as a careful PyTorch user would write it: honest and reasonably tuned, not a strawman,
and independent of lgeo_jax (no module here imports it), so a benchmark harness can run both sides on
identical inputs. Every entry point is a plain function of numpy arrays, paths and Hugging Face / PEFT
directories, and sets torch's thread count from its ``threads`` argument (default: every core).

- `extract`: transformers Gemma-2 (eager attention, which applies Gemma's attention softcap) with every
  PEFT adapter loaded into one `PeftModel`; the base pass under ``disable_adapter()`` and one pass per
  adapter (`set_adapter`), as torch users switch adapters. Residuals are captured by forward hooks on
  the decoder blocks (the last block included: transformers' own last hidden state has the final norm
  applied), and the forward stops after the deepest requested block. Output
  ``[1 + n_adapters, n_layers, B, T, D]`` float32, index 0 = base; deltas subtracted in float32.
- `train_lora`: one PEFT model per rank, trained one after another with a plain loop (fused AdamW,
  transformers' LR schedules, clipping, gradient accumulation, response-only loss via ``labels = -100``).
- `sae`: ReLU SAEs with lgeo_jax's conventions (RMS-scaled input, MSE summed over d, L1 on activations,
  Adam, unit-norm decoder rows after every step), as a loop over SAEs, as all SAEs batched with
  `torch.baddbmm`, and through SAELens' own `SAETrainer.step`.
- `geometry`: chunked max-cosine, top singular subspaces (`torch.linalg.svd`) and principal angles
  (float64, small-angle accurate), streamed linear CKA with float64 accumulation.
- `corpus`: bf16 rows in a numpy memmap, written in batches, read back as shuffled batches
  (chunk shuffle + in-buffer shuffle).

Choices a torch user would make and we keep: `torch.inference_mode()` for every pass without gradients,
preallocated outputs filled in place, fused optimizers. Not used: `torch.compile` (the reference is
eager PyTorch, as most users run it) and hand-written kernels.
"""
