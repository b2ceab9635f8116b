"""Defaults and schema of every experiment config: the DDPM CIFAR-10 recipe (Ho et al. 2020).

Experiment files under ``configs/`` start from ``get_config()`` here and override what differs;
a key that is not here is an error. Every key is
validated by ``diffusion_jax.config_lib.validate`` before anything compiles.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data = ml_collections.ConfigDict()
    data.name = "cifar10"  # "digits" (embedded, scikit-learn) or a TFDS name
    data.split = "train"
    data.image_size = 32
    data.channels = 3
    data.random_flip = True
    data.shuffle = True
    data.num_workers = 0  # grain worker processes; 0 reads in the training process
    data.prefetch = 2  # batches buffered ahead
    data.data_dir = ml_collections.FieldReference(None, field_type=str)

    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.num_groups = 32  # GroupNorm groups; every level's channels must be divisible by it
    model.class_conditional = False

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "linear"
    diffusion.num_timesteps = 1000
    diffusion.mean_type = "eps"
    diffusion.var_type = "fixed_large"
    diffusion.loss_type = "simple"
    diffusion.loss_weighting = "none"
    diffusion.min_snr_gamma = 5.0
    diffusion.p2_k = 1.0
    diffusion.p2_gamma = 1.0
    diffusion.vlb_weight = 0.001
    diffusion.timestep_sampling = "uniform"  # or "importance" (vlb / hybrid losses)

    config.optim = optim = ml_collections.ConfigDict()
    optim.learning_rate = 2e-4
    optim.warmup_steps = 5000
    optim.grad_clip_norm = 1.0  # global gradient norm clipped to this; 0 disables clipping
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.ema_decay = 0.9999

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128  # global, over all processes and devices
    training.num_steps = 800_000
    training.grad_accum_steps = 1
    training.compute_dtype = "float32"  # or "bfloat16" (params stay float32)
    training.fsdp = 1  # devices a parameter is sharded over; 1 = pure data parallel
    training.log_every = 100
    training.checkpoint_every = 5000
    training.keep_checkpoints = 3
    training.sample_every = 20_000  # 0 disables sample grids

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.num_samples = 64
    sampling.method = "ancestral"
    sampling.num_steps = 0  # 0 = all T steps, else respaced to this many
    sampling.eta = 0.0
    sampling.clip_denoised = True
    return config


def get_config_256(data_name: str):
    """DDPM's 256x256 recipe (Ho et al. 2020, Appendix B; CelebA-HQ and LSUN): ch_mult
    (1,1,2,2,4,4), attention at 16x16, batch 64, dropout 0.0, lr 2e-5, EMA 0.9999."""
    config = get_config()
    config.data.name = data_name
    config.data.image_size = 256
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0
    config.optim.learning_rate = 2e-5
    config.training.batch_size = 64
    config.training.num_steps = 500_000
    config.sampling.num_samples = 16
    return config
