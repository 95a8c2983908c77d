"""The job config schema: one typed dataclass per TOML section.

Every field carries a one-line docstring (the string literal right below it). The loader reads those
strings for `--help` and for the README's config reference, so they are the single source of truth
for what a key means. Section and key names follow the TOML schema torchtitan users already know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Job:
    config_file: str | None = None
    """TOML file to load (run_train.sh passes CONFIG_FILE here)."""
    dump_folder: str = "./outputs"
    """Folder for everything a run writes: config.toml, metrics.jsonl, TensorBoard events, checkpoints."""
    description: str = ""
    """Free-text description of the job, echoed in the log."""
    print_config: bool = False
    """Log the fully resolved config at start-up."""


@dataclass
class Model:
    name: str = "llama3"
    """Model family (registered under torchtitan_like/models)."""
    flavor: str = "debugmodel"
    """Model size within the family: debugmodel (and its wider debugmodel_w512, debugmodel_w1024, and debugmodel_tied with tied embeddings), 1B, 3B, 8B, 70B, 405B, 8B_slice8 (8B width, 8 layers: one-GPU benchmarks)."""
    tokenizer_path: str = ""
    """Llama 3 format tokenizer.model (base64 token + rank per line), a Llama 3 family Hugging Face tokenizer.json, or a folder with either (original/tokenizer.model first, then tokenizer.model, then tokenizer.json); empty = the embedded tokenizer."""
    hf_assets_path: str = ""
    """torchtitan's folder of Hugging Face assets (tokenizer files, config.json, safetensors): where model.tokenizer_path is unset the tokenizer is read from it, and with checkpoint.initial_load_in_hf and no initial_load_path the weights too; empty = none."""
    max_seq_len: int | None = None
    """Override the flavor's RoPE table length (defaults to training.seq_len)."""
    n_layers: int | None = None
    """Override the flavor's number of transformer blocks, keeping its width: a few layers of a large flavor for a quick run or benchmark; unset = the flavor's."""
    converters: list[Literal["float8", "quantize.linear.float8"]] = field(default_factory=list)
    """Model converters applied to the meta model before any parallelism: float8 (alias quantize.linear.float8)."""
    attn_mask_type: Literal["causal", "block_causal"] = "causal"
    """causal: each token attends to every earlier token of its sequence; block_causal: only to earlier tokens of its own document (documents start at the tokenizer's bos, or after its eos), so packed documents do not see each other."""
    attn_type: Literal["sdpa", "flex"] = "sdpa"
    """Attention kernel: sdpa (scaled_dot_product_attention; block_causal builds a dense batch x seq_len x seq_len mask) or flex (FlexAttention, compiled; skips masked tiles; needs CUDA to train)."""


@dataclass
class Optimizer:
    name: Literal["AdamW", "Adam"] = "AdamW"
    """Optimizer class from torch.optim."""
    lr: float = 8e-4
    """Peak learning rate."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW) or L2 penalty (Adam)."""
    no_weight_decay_keywords: list[str] = field(default_factory=list)
    """Glob patterns (fnmatch) over parameter names, e.g. ["*norm*", "tok_embeddings.*"]: matching parameters get no weight decay; empty = every parameter decays (as torchtitan). Names as in checkpoints (tok_embeddings.weight, layers.0.attention_norm.weight, norm.weight, output.weight); each pattern must match one."""
    implementation: Literal["fused", "foreach", "for-loop"] = "fused"
    """Kernel implementation: fused (fastest where the device supports it), foreach, or for-loop."""


@dataclass
class LRScheduler:
    warmup_steps: int = 200
    """Steps of linear warmup: the k-th runs at k/(warmup_steps + 1) of optimizer.lr (torchtitan: k/warmup_steps; README, Training)."""
    decay_ratio: float | None = None
    """Fraction of all training steps spent decaying, at the end (warmup-stable-decay, as torchtitan); unset = decay over every step after warmup."""
    decay_type: Literal["linear", "sqrt", "cosine"] = "linear"
    """Shape of the decay phase."""
    min_lr_factor: float = 0.0
    """Learning rate of the schedule's last step (the end of decay) and of any step after it, as a fraction of optimizer.lr."""
    total_steps: int | None = None
    """Steps the schedule spans (warmup, stable, decay; decay_ratio is a fraction of these); unset = training.steps. Set it to stop a run early, or try a few steps, on the learning-rate curve of the full run (as torchtitan)."""


@dataclass
class Training:
    local_batch_size: int = 8
    """Sequences per micro-batch on each data-parallel rank."""
    global_batch_size: int = -1
    """Sequences per optimizer step over all ranks; -1 = local_batch_size x data-parallel degree (no accumulation)."""
    seq_len: int = 2048
    """Tokens per sequence."""
    loss_chunk_size: int = 0
    """Compute the output projection and loss this many positions at a time, so the full (batch, seq_len, vocab) logits never exist at once (for long sequences); 0 = all at once."""
    eod_mask_loss: bool = False
    """Leave out of the loss (training and validation) each position whose input is the tokenizer's eos, whose label is the next document's first token in eos-only data such as Megatron-LM's (nothing before it predicts it) or the next bos in [bos] doc [eos] packing. Megatron-LM's --eod-mask-loss."""
    max_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still reported)."""
    steps: int = 10000
    """Optimizer steps to train (0: none, to evaluate loaded weights with checkpoint.load_only and [validation])."""
    dataset: Literal["embedded", "synthetic", "local", "hf", "indexed"] = "embedded"
    """Data source: embedded (Python standard library sources), synthetic (random tokens), local files, an HF hub dataset, or indexed (pre-tokenized PREFIX.bin + PREFIX.idx, Megatron-LM's format)."""
    dataset_path: str | None = None
    """For local: a .txt/.jsonl/.json file, a directory or a glob. For hf: the hub dataset name. For indexed: PREFIX, or several separated by commas (a blend: see dataset_weights)."""
    dataset_weights: list[float] = field(default_factory=list)
    """For indexed with several prefixes in dataset_path: their relative sampling weights, one each (e.g. [0.7, 0.3])."""
    dataset_shuffle: bool = False
    """For indexed: read each source's windows in a pseudo-random order, a new one each epoch (seeded by debug.seed); false: in file order."""
    dataset_text_field: str = "text"
    """Field holding the document text in .jsonl/.json records and HF datasets."""
    dataset_split: str = "train"
    """Split to read from an HF hub dataset."""
    dataset_config: str | None = None
    """Configuration (subset) of an HF hub dataset that has several, e.g. "en" for allenai/c4; unset = its default."""
    prefetch_batches: int = 4
    """Microbatches tokenized ahead on a background thread (checkpoints stay exact); 0 = on the main thread."""
    mixed_precision_param: Literal["auto", "bfloat16", "float32"] = "auto"
    """Compute dtype for parameters: auto = bfloat16 on CUDA, float32 on CPU (and bfloat16 with dtype = bfloat16)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of parameters, gradients and optimizer states: float32 (mixed precision keeps a float32 master copy), or bfloat16 for all of them, with no float32 copy (half the state memory; coarser updates). The RoPE table, softmax and loss stay float32."""
    mixed_precision_reduce: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the data-parallel gradient reduction."""
    gc_freq: int = 50
    """Run Python's garbage collector every N steps (automatic gc is disabled during training); 0 = leave gc automatic."""
    enable_cpu_offload: bool = False
    """FSDP2: keep parameters, gradients and optimizer states in CPU memory."""


@dataclass
class Metrics:
    log_freq: int = 10
    """Log one metrics line (console, TensorBoard, metrics.jsonl) every N steps."""
    enable_tensorboard: bool = False
    """Write TensorBoard event files."""
    save_tb_folder: str = "tb"
    """TensorBoard folder, relative to job.dump_folder."""
    peak_tflops: float | None = None
    """Peak TFLOPS per device for MFU; unset = look the device up in the built-in table (CPU: MFU shows n/a)."""


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    """Replicas of the model (DDP, or the replicate dimension of HSDP)."""
    data_parallel_shard_degree: int = -1
    """FSDP shard degree; -1 = whatever the world size leaves after the other degrees."""
    tensor_parallel_degree: int = 1
    """Tensor parallel degree (with sequence parallel); must divide model n_heads and n_kv_heads."""
    context_parallel_degree: int = 1
    """Context parallel degree: ranks each sequence is split across (ring attention); needs model.max_seq_len = training.seq_len."""
    context_parallel_rotate_method: Literal["allgather", "alltoall"] = "allgather"
    """How context parallel's ring attention exchanges K/V: allgather (one all-gather) or alltoall (ring of point-to-point exchanges)."""
    pipeline_parallel_degree: int = 1
    """Pipeline parallel degree: ranks the layers are split across (1 disables it)."""
    pipeline_parallel_schedule: str = "1F1B"
    """torch.distributed.pipelining schedule: GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV (if the installed torch has it)."""
    pipeline_parallel_schedule_csv: str | None = None
    """A custom schedule as a compute-only CSV (one row per rank, actions like 0F0,0B0); overrides pipeline_parallel_schedule."""
    pipeline_parallel_microbatch_size: int = 1
    """Samples per pipeline microbatch; training.local_batch_size must be a multiple of it."""
    pipeline_parallel_layers_per_stage: int | None = None
    """Transformer layers per pipeline stage (counting the embedding and output as *_less_layers); unset = 1 stage per rank (2 for interleaved and V schedules)."""
    pipeline_parallel_first_stage_less_layers: int = 1
    """The first stage gets this many fewer layers, for the cost of the token embedding."""
    pipeline_parallel_last_stage_less_layers: int = 1
    """The last stage gets this many fewer layers, for the cost of the final norm, output projection and loss."""
    module_fqns_per_model_part: list[list[str]] | None = None
    """An explicit split: the module names of each stage in order, e.g. [["tok_embeddings", "layers.0"], ["layers.1", "norm", "output"]]; on the CLI parts are separated by ';'."""
    expert_parallel_degree: int = 1
    """Expert parallel degree (reserved for MoE models; must be 1)."""
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    """Free gathered parameters after forward: default = yes for the blocks, no for [norm, output] and the root, whose backward comes right after (and no with pipeline parallel, where every microbatch would gather again)."""
    disable_loss_parallel: bool = False
    """With TP, gather the full logits before the loss instead of computing it on vocab shards."""
    enable_async_tensor_parallel: bool = False
    """Overlap TP communication with matmuls (needs CUDA and compile.enable with backend inductor)."""


@dataclass
class Checkpoint:
    enable: bool = False
    """Save distributed (DCP) checkpoints and resume from the latest complete one on restart."""
    folder: str = "checkpoint"
    """Checkpoint folder, relative to job.dump_folder; each save is a step-N subfolder."""
    interval: int = 500
    """Save every N steps (the last step is always saved)."""
    async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = "disabled"
    """disabled = save blocks training; async = save in the background; async_with_pinned_mem = also stage in pinned memory."""
    keep_latest_k: int = 10
    """Keep only the newest K complete checkpoints (older ones are purged in the background; never load_step's, and newer ones left behind by going back to load_step are purged first); 0 keeps all."""
    load_step: int = -1
    """Step to resume from (go back to); -1 = the latest complete checkpoint. A restart of the same command resumes the newest checkpoint saved after going back."""
    exclude_from_loading: list[str] = field(default_factory=list)
    """State to skip when resuming: any of model, optimizer, lr_scheduler, dataloader, train_state."""
    last_save_model_only: bool = True
    """The final save holds only the model weights (in export_dtype), for inference or fine-tuning."""
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the weights in a model-only save."""
    initial_load_path: str | None = None
    """Checkpoint to start from when the run has none of its own (a step-N folder, ours or torchtitan's, or HF safetensors with initial_load_in_hf)."""
    initial_load_model_only: bool = True
    """From initial_load_path, load only the model weights; false: the whole state (from torchtitan's layout: weights, optimizer, schedule position, step; not its data position)."""
    initial_load_in_hf: bool = False
    """initial_load_path is a Hugging Face safetensors folder (LlamaForCausalLM names)."""
    last_save_in_hf: bool = False
    """Also export the final weights as Hugging Face safetensors (LlamaForCausalLM names), with config.json and the
    run's tokenizer (tokenizer.json, tokenizer_config.json), into the last step's hf/ folder."""
    create_seed_checkpoint: bool = False
    """Only initialize the model and save it as step-0 (run on one process), then exit."""
    enable_first_step_checkpoint: bool = False
    """Also save the full state right after the run's first step (step 1, or the first after a resume): checks saving on new storage at once."""
    load_only: bool = False
    """Resume (or load initial_load_path) as usual, but never save: for evaluating or debugging from a checkpoint. With
    [validation] enabled and training.steps at the loaded step (nothing to train), it validates the loaded weights once."""


@dataclass
class ActivationCheckpoint:
    mode: Literal["none", "full", "selective", "memory_budget"] = "none"
    """Recompute activations in backward: none, full (every block), selective (see selective_ac_option), or memory_budget (the compiler chooses, see memory_budget)."""
    selective_ac_option: str = "2"
    """With mode = selective: an integer N (checkpoint every N-th block) or "op" (save matmul/attention outputs, recompute the rest)."""
    memory_budget: float = 0.5
    """With mode = memory_budget (needs compile.enable with "model" and the inductor or aot_eager backend): the activation memory torch.compile's partitioner may keep in each compiled block, from 0.0 (as little as full checkpointing) to 1.0 (its default, fastest)."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each transformer block (fullgraph) and, if listed, the loss."""
    components: list[Literal["model", "loss"]] = field(default_factory=lambda: ["model", "loss"])
    """What compile.enable compiles: model (per transformer block) and/or loss."""
    backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """torch.compile backend: inductor (generates kernels), aot_eager or eager (debugging)."""


@dataclass
class Float8:
    recipe_name: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = "tensorwise"
    """torchao float8 recipe: tensorwise (one scale per tensor), rowwise, or rowwise_with_gw_hp (grad_weight in high precision)."""
    enable_fsdp_float8_all_gather: bool = False
    """FSDP all-gathers the weights in float8 (tensorwise only; needs FSDP: data_parallel_shard_degree x context_parallel_degree > 1)."""
    precompute_float8_dynamic_scale_for_fsdp: bool = False
    """Compute every weight's float8 scale in one all-reduce after optimizer.step (needs enable_fsdp_float8_all_gather)."""
    filter_fqns: list[str] = field(default_factory=lambda: ["output"])
    """Linear layers to keep in high precision, by name substring (one that matches no layer is an error); "auto_filter_small_kn" also skips those too small to gain."""
    emulate: bool = False
    """Emulate float8 matmuls in high precision (for testing on devices without float8 support)."""


@dataclass
class QuantizeLinear:
    float8: Float8 = field(default_factory=Float8)
    """[quantize.linear.float8]"""


@dataclass
class Quantize:
    linear: QuantizeLinear = field(default_factory=QuantizeLinear)
    """[quantize.linear]"""


@dataclass
class Comm:
    init_timeout_seconds: int = 300
    """Process-group timeout until the first step has finished (start-up, first compile)."""
    train_timeout_seconds: int = 100
    """Process-group timeout from the second step on: a collective stuck this long fails the job."""
    trace_buf_size: int = 20000
    """Flight recorder: keep the last N collectives of every process group (0 = off); a failing rank (and NCCL on a timeout) writes them to save_traces_folder."""
    save_traces_folder: str = "comm_traces"
    """Flight recorder files, relative to job.dump_folder: save_traces_file_prefix + rank; read them with python -m torch.distributed.flight_recorder.fr_trace FOLDER."""
    save_traces_file_prefix: str = "rank_"
    """Flight recorder file name before the rank number."""


@dataclass
class Profiling:
    enable_profiling: bool = False
    """Record torch.profiler traces (Chrome/Perfetto JSON, one file per rank) every profile_freq steps."""
    save_traces_folder: str = "profile_traces"
    """Trace folder, relative to job.dump_folder: iteration_N/rank{R}_trace.json per capture."""
    profile_freq: int = 10
    """Capture a trace (and a memory snapshot) every N steps."""
    profiler_warmup: int = 3
    """Warm-up steps before each capture (profiled, then discarded)."""
    profiler_active: int = 1
    """Steps recorded in each trace."""
    enable_memory_snapshot: bool = False
    """Record CUDA memory history; dump a snapshot every profile_freq steps and on out-of-memory (needs a GPU)."""
    save_memory_snapshot_folder: str = "memory_snapshot"
    """Memory snapshot folder, relative to job.dump_folder: iteration_N/rank{R}_memory_snapshot.pickle."""


@dataclass
class Validation:
    enable: bool = False
    """Compute the loss and perplexity on held-out data every freq steps (val_loss, val_ppl in the metrics)."""
    dataset: Literal["embedded", "synthetic", "local", "hf", "indexed"] = "embedded"
    """Held-out data: embedded (stdlib tests and tools, never trained on), synthetic (another seed), local files, HF hub, or indexed."""
    dataset_path: str | None = None
    """For local: a .txt/.jsonl/.json file, a directory or a glob (text in training.dataset_text_field). For hf: the hub name. For indexed: PREFIX."""
    dataset_split: str = "validation"
    """Split to read from an HF hub dataset."""
    dataset_config: str | None = None
    """Configuration (subset) of an HF hub dataset that has several, e.g. "en" for allenai/c4; unset = its default."""
    freq: int = 10
    """Validate every N steps, and at the last step (training.steps)."""
    steps: int = -1
    """Global batches per validation; -1 = the whole dataset (synthetic data needs a number: it never ends)."""
    local_batch_size: int = 8
    """Sequences per validation batch on each data-parallel rank."""
    global_batch_size: int = -1
    """Sequences per validation batch over all data-parallel ranks (each rank reads it as microbatches of
    local_batch_size); -1 = local_batch_size x data-parallel degree. Set it to validate on the same sequences
    under every layout when validation.steps is a number."""
    seq_len: int | None = None
    """Tokens per validation sequence; unset = training.seq_len (at most the model's RoPE length: model.max_seq_len
    or training.seq_len; equal to training.seq_len under context or pipeline parallel)."""


@dataclass
class Debug:
    seed: int = 42
    """Seed for weight init, data order and every random number generator."""
    deterministic: bool = False
    """Use deterministic algorithms (slower; for exact reproducibility)."""
    deterministic_warn_only: bool = False
    """With deterministic: warn about an op that has no deterministic implementation instead of failing on it."""
    fail_at_step: int = 0
    """For testing fault handling only: raise an error at the start of this step (0 = never)."""
    fail_rank: int = 0
    """For testing fault handling only: the rank that raises at fail_at_step (-1 = every rank)."""
    hang_at_step: int = 0
    """For testing fault handling only: block forever at the start of this step, until killed (0 = never)."""
    hang_rank: int = 0
    """For testing fault handling only: the rank that blocks at hang_at_step (-1 = every rank)."""


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    """[job]"""
    model: Model = field(default_factory=Model)
    """[model]"""
    optimizer: Optimizer = field(default_factory=Optimizer)
    """[optimizer]"""
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    """[lr_scheduler]"""
    training: Training = field(default_factory=Training)
    """[training]"""
    metrics: Metrics = field(default_factory=Metrics)
    """[metrics]"""
    parallelism: Parallelism = field(default_factory=Parallelism)
    """[parallelism]"""
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    """[checkpoint]"""
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    """[activation_checkpoint]"""
    compile: Compile = field(default_factory=Compile)
    """[compile]"""
    quantize: Quantize = field(default_factory=Quantize)
    """[quantize]"""
    comm: Comm = field(default_factory=Comm)
    """[comm]"""
    profiling: Profiling = field(default_factory=Profiling)
    """[profiling]"""
    validation: Validation = field(default_factory=Validation)
    """[validation]"""
    debug: Debug = field(default_factory=Debug)
    """[debug]"""
