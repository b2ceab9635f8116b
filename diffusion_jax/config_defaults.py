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
    data.name = "cifar10"  # "digits" (embedded, scikit-learn), "folder" (data.path) or a TFDS name
    data.split = "train"
    data.image_size = 32
    data.channels = 3
    data.random_flip = True
    data.shuffle = True
    data.num_workers = 0  # grain worker processes; 0 reads in the training process
    data.prefetch = 2  # batches buffered ahead
    # TFDS data sets live in data_dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets); one
    # missing there is downloaded and prepared by the first run, unless download is False.
    data.data_dir = ml_collections.FieldReference(None, field_type=str)
    data.download = True
    data.path = ""  # data.name "folder": directory of image files, labels from subdirectories

    config.model = model = ml_collections.ConfigDict()
    # "denoiser": the network of the diffusion model; "classifier": the noisy-image classifier
    # of p(y | x_t) for classifier guidance (models.NoisyClassifier: the U-Net's down half and
    # middle block, a pooled head), trained on x_t of the objective by cross-entropy;
    # "autoencoder": the autoencoder of latent diffusion (group model.autoencoder below).
    model.kind = "denoiser"
    # The network (diffusion_jax.models.NETWORKS), each with its group of hyperparameters below
    # (the group of a network not chosen must keep its defaults): "unet", DDPM's U-Net with
    # ADM's options (Ho et al. 2020; Nichol & Dhariwal 2021; Dhariwal & Nichol 2021), or "dit",
    # the Diffusion Transformer (Peebles & Xie 2023). A classifier is the U-Net's down half.
    model.name = "unet"
    model.class_conditional = False
    # Classifier-free guidance training: each example's label is replaced by the null label
    # with this probability, so one network learns p(x | y) and p(x). Needs class_conditional.
    model.label_dropout = 0.0
    # The label table's extra "no label" row (classifier-free guidance). False: ADM's table of
    # num_classes rows, for a class-conditional model that is never trained without labels.
    model.null_label = True

    model.unet = unet = ml_collections.ConfigDict()  # attributes of models.UNet
    unet.ch = 128
    unet.ch_mult = (1, 2, 2, 2)
    unet.num_res_blocks = 2
    unet.attn_resolutions = (16,)  # spatial sizes (H) with self-attention
    unet.dropout = 0.1
    unet.resamp_with_conv = True
    unet.num_groups = 32  # GroupNorm groups; every level's channels must be divisible by it
    unet.scale_shift_norm = False  # ADM's AdaGN: the time embedding scales and shifts the norm
    unet.num_heads = 1  # attention heads
    unet.num_head_channels = 0  # if > 0: channels per head instead of num_heads (ADM: 64)
    unet.resblock_updown = False  # BigGAN-style ResBlocks resample between levels

    # model.kind "autoencoder": the image autoencoder of latent diffusion, trained on its own
    # (models.autoencoder.AutoencoderKL; defaults: the Stable Diffusion VAE's sizes). Its loss
    # per image: the mean squared error of the reconstruction of a posterior sample plus
    # kl_weight x KL(q(z | x) || N(0, I)) summed over the latent (nats; SD's weight 1e-6).
    model.autoencoder = ae = ml_collections.ConfigDict()
    ae.block_out_channels = (128, 256, 512, 512)  # the down factor is 2**(levels - 1)
    ae.layers_per_block = 2
    ae.latent_channels = 4
    ae.norm_num_groups = 32
    ae.mid_block_attention = True
    ae.kl_weight = 1e-6

    model.dit = dit = ml_collections.ConfigDict()  # attributes of models.DiT; defaults: DiT-S/2
    dit.patch_size = 2
    dit.hidden_size = 384
    dit.depth = 12
    dit.num_heads = 6
    dit.mlp_ratio = 4.0
    # The constants of the official code ("official") or of diffusers' DiTTransformer2DModel
    # ("diffusers"), for weights imported from either (diffusion_jax.dit_weights).
    dit.numerics = "official"
    # Run the blocks as one lax.scan over their stacked parameters (same parameters, same
    # results): one compiled block, and with training.remat="block" one block's activations
    # held at a time; what fits DiT-XL/2 on 16 GiB devices (docs/networks.md).
    dit.scan_blocks = False

    # The training objective (diffusion_jax.objectives): "ddpm" (its options are the
    # `diffusion` group below, the name every run saved before objectives existed), "edm"
    # (Karras et al. 2022) or "flow" (flow matching on the straight path). The group of an
    # objective not chosen must keep its defaults.
    config.objective = objective = ml_collections.ConfigDict()
    objective.name = "ddpm"
    objective.edm = edm = ml_collections.ConfigDict()
    edm.sigma_data = 0.5  # standard deviation of the data, for the preconditioning
    edm.p_mean = -1.2  # training noise levels: ln sigma ~ N(p_mean, p_std^2)
    edm.p_std = 1.2
    edm.sigma_min = 0.002  # the sampler's grid of noise levels, rho-spaced (EDM eq. 5)
    edm.sigma_max = 80.0
    edm.rho = 7.0
    objective.flow = flow = ml_collections.ConfigDict()
    flow.time_sampling = "logit_normal"  # training times: "uniform" or SD3's logit-normal
    flow.logit_mean = 0.0
    flow.logit_std = 1.0
    flow.shift = 1.0  # SD3's time shift of training times and the sampler's grid; 1 = none

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
    # Decoupled weight decay (AdamW, Loshchilov & Hutter 2019): each update also subtracts
    # learning_rate * weight_decay * params. 0 = plain Adam (DDPM).
    optim.weight_decay = 0.0
    optim.ema_decay = 0.9999

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128  # global, over all processes and devices
    training.num_steps = 800_000
    training.grad_accum_steps = 1
    training.compute_dtype = "float32"  # or "bfloat16" (params stay float32)
    training.fsdp = 1  # devices a parameter is sharded over; 1 = pure data parallel
    # Activation rematerialisation: "none", or "block" (each residual/attention/transformer
    # block's activations recomputed in the backward pass: less memory, more FLOPs).
    training.remat = "none"
    # Devices that split each layer between them (Megatron-style tensor parallelism: heads and
    # hidden units; diffusion_jax.sharding); they see the same examples. 1 = none.
    training.tensor_parallel = 1
    training.log_every = 100
    training.checkpoint_every = 5000
    training.keep_checkpoints = 3
    training.sample_every = 20_000  # 0 disables sample grids
    # Evaluation during training: every eval_every steps (0: never) the step is checkpointed
    # and the modes of eval_modes ("fid", "bpd"; a classifier's "accuracy") score its EMA
    # parameters as the evaluation program would, with the `eval` group's settings but these
    # sizes; each adds a line to eval/during_training.jsonl and TensorBoard scalars eval/<mode>/*.
    training.eval_every = 0
    training.eval_modes = ("fid",)
    training.eval_num_samples = 1000  # fid: samples per evaluation, generated in memory
    training.eval_num_examples = 1000  # bpd, accuracy: the first ones of eval.split; 0 = all
    # Post-hoc EMA (Karras et al. 2024; diffusion_jax.posthoc_ema): the relative standard
    # deviations (fractions of the training so far) of the power-function EMAs to track, () =
    # none (EDM2: (0.05, 0.10)), and the steps between their snapshots in WORKDIR/posthoc_ema,
    # from which `python -m diffusion_jax.posthoc_ema` builds the EMA of any other length.
    training.posthoc_ema_stds = ()
    training.posthoc_ema_every = 10_000

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.num_samples = 64
    # ddpm: any of diffusion_jax.sampling.SAMPLING_METHODS; edm and flow: any of
    # diffusion_jax.ode_sampling.METHODS (euler, heun, edm_stochastic, dpmpp_2m, dpmpp_3m).
    sampling.method = "ancestral"
    # Grid steps: ddpm: 0 = all T, else this many timesteps picked by `spacing`; edm and flow:
    # the steps of the objective's time grid (>= 1). Network evaluations are as many (heun and
    # edm_stochastic: 2 * num_steps - 1).
    sampling.num_steps = 0
    sampling.spacing = "even"  # even, quad, logsnr or trailing (schedules.spaced_timesteps)
    sampling.eta = 0.0  # ddim only
    # EDM's stochastic sampler (method edm_stochastic): S_churn, and the range of noise
    # levels sigma / alpha [s_tmin, s_tmax] where it adds noise, of standard deviation s_noise.
    sampling.churn = 0.0
    sampling.s_tmin = 0.0
    sampling.s_tmax = float("inf")
    sampling.s_noise = 1.0
    sampling.clip_denoised = True  # ddpm samplers: clip each x0 prediction to [-1, 1]
    sampling.dynamic_threshold = 0.0  # percentile of |x0| (e.g. 0.995) instead of clipping; 0 off
    # Class labels of a class-conditional model or of classifier guidance: sample i gets
    # labels[i % len(labels)]; () = every class in turn (0, 1, ..., K-1, 0, ...).
    sampling.labels = ()
    # "none", "classifier_free" (Ho & Salimans 2022; needs model.label_dropout > 0),
    # "classifier" (Dhariwal & Nichol 2021; the noisy classifier trained in classifier_workdir)
    # or "autoguidance" (Karras et al. 2024; the weaker model of guide_workdir, guide_step).
    sampling.guidance = "none"
    # w of classifier-free guidance and autoguidance (EDM2's autoguidance weight is 1 + w), s of
    # classifier guidance; 0 is unguided.
    sampling.guidance_scale = 0.0
    sampling.classifier_workdir = ""  # workdir of a model.kind "classifier" run (latest step)
    # Autoguidance's guide: a denoiser of the same objective, process, images and classes; its
    # workdir ("" = this run's) and checkpoint step (0 = the latest there).
    sampling.guide_workdir = ""
    sampling.guide_step = 0
    # Guidance only at noise levels sigma in (lo, hi] (Kynkaanniemi et al. 2024), sigma on the
    # objective's sigma / alpha scale: EDM's sigma, ddpm's sqrt((1 - abar_t) / abar_t), flow's
    # t / (1 - t); elsewhere unguided. () = at every level.
    sampling.guidance_interval = ()

    # The evaluation program (python -m diffusion_jax.evaluate); its sampler is `sampling.*`.
    config.eval = ev = ml_collections.ConfigDict()
    ev.split = "test"  # bpd and the figures' rate-distortion curve are measured on this split
    ev.num_examples = 0  # examples of `split` to evaluate; 0 = all of them
    ev.num_samples = 50_000  # samples generated by mode=sample and scored by mode=fid
    ev.batch_size = 256  # global batch of every network call (all devices and processes)
    ev.seed = 0  # noise of samples and of the bound's terms, keyed by example index
    ev.exact_cdf = False  # bpd decoder: exact normal CDF, or the originals' tanh approximation
    ev.ode_steps = 256  # bpd of edm and flow: Heun steps of the probability-flow ODE
    ev.sample_dir = ""  # where mode=sample writes and mode=fid reads; "" = eval/samples_step<N>
    ev.reference_split = "train"  # FID/KID/precision/recall against this split of data.name
    ev.reference_dir = ""  # cache of reference statistics; "" = ~/.cache/diffusion_jax/reference
    ev.inception_weights = ""  # pt_inception-2015-12-05-6726825d.pth or its converted .npz
    # FD-DINOv2 beside FID in mode=fid: dinov2_vitl14_pretrain.pth or the model.safetensors of
    # facebook/dinov2-large (docs/evaluation.md); "" = off.
    ev.dinov2_weights = ""
    ev.precision_recall_samples = 10_000  # per set; the k-NN radii cost grows as its square
    return config


def get_config_256(data_name: str):
    """DDPM's 256x256 recipe (Ho et al. 2020, Appendix B; CelebA-HQ and LSUN): ch_mult
    (1,1,2,2,4,4), attention at 16x16, batch 64, dropout 0.0, lr 2e-5, EMA 0.9999. On 8 devices
    of 16 GiB, add ``training.grad_accum_steps=2`` with bfloat16 (docs/networks.md, memory)."""
    config = get_config()
    config.data.name = data_name
    config.data.image_size = 256
    config.model.unet.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.unet.attn_resolutions = (16,)
    config.model.unet.dropout = 0.0
    config.optim.learning_rate = 2e-5
    config.training.batch_size = 64
    config.training.num_steps = 500_000
    config.sampling.num_samples = 16
    return config


def make_class_conditional(config):
    """``config`` made class-conditional for classifier-free guidance: a label embedding, each
    example's label dropped with probability 0.1 (Ho & Salimans 2022 found 0.1 and 0.2 the best
    of their label-drop rates), so the network also learns the unconditional model; preview
    grids of 100 samples, 10 of each class of 10, one row per class. Returns ``config``."""
    config.model.class_conditional = True
    config.model.label_dropout = 0.1
    config.sampling.num_samples = 100
    return config


def use_objective(config, name: str, *, method: str = "heun", num_steps: int = 18):
    """``config`` trained with objective ``name`` ("edm" or "flow") instead of DDPM: the ddpm
    group (``diffusion``) back to its defaults, which another objective does not read, and the
    sampler set to ``method`` over ``num_steps`` steps of the objective's time grid (Heun's 18
    steps: 35 network evaluations, EDM's CIFAR-10 choice). Returns ``config``."""
    config.objective.name = name
    config.diffusion = get_config().diffusion
    config.sampling.method = method
    config.sampling.num_steps = num_steps
    return config


def use_network(config, name: str, **attributes):
    """``config`` with the network ``name`` ("unet" or "dit") set to ``attributes`` (keys of
    its group ``model.<name>``; the others keep the group's defaults), and every other
    network's group back to its defaults, which the chosen network does not read. Returns
    ``config``."""
    defaults = get_config().model
    config.model.name = name
    for other in ("unet", "dit"):
        config.model[other] = defaults[other]
    config.model[name].update(attributes)
    return config


def get_config_digits():
    """The quick start (``configs/digits.py``): DDPM on the 8x8 handwritten digits that ship
    with scikit-learn, on the 1500 training images at their native 8x8 grayscale (the other
    297 are the held-out test split). A small U-Net (ch 32, 8x8 -> 4x4), T=200 linear steps,
    batch 128; about 4 minutes on a 2-core CPU."""
    config = get_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric
    config.model.unet.ch = 32
    config.model.unet.ch_mult = (1, 2)
    config.model.unet.num_res_blocks = 1
    config.model.unet.attn_resolutions = (4,)
    config.model.unet.dropout = 0.0
    config.diffusion.num_timesteps = 200
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.995
    config.training.batch_size = 128
    config.training.num_steps = 2000
    config.training.log_every = 100
    config.training.checkpoint_every = 1000
    config.training.sample_every = 1000
    config.sampling.num_samples = 64
    # Evaluation: bpd on the 297 held-out test digits; 1000 samples scored by the digits
    # classifier's Fréchet distance against the train split.
    config.eval.num_samples = 1000
    config.eval.batch_size = 500
    return config
