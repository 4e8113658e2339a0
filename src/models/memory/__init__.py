"""Fitting the card: the memory modes (`modes`), the plan of what a job needs (`plan`), the VAE's
memory levers (`image_vae`) and the transformers taking turns on the GPU (`transformer_swap`)."""
