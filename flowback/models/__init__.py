"""TARFlow / STARFlow normalizing flows (tarflow.py), their guidance rules (guidance.py), samplers (sampling.py,
jacobi.py), the VAE of latent mode (vae.py) and its decoder fine-tuning (decoder_finetune.py).

Import from the submodules: this package imports nothing itself, so a stage that needs only the VAE does not depend
on (and is not rerun for a change to) the flow's code.
"""
