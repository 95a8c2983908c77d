"""Float8 training through torchao: a model converter, applied to the meta model before any parallelism.

`model.converters = ["float8"]` (or its torchtitan name "quantize.linear.float8") swaps the
`nn.Linear` layers that pass the filter for torchao's `Float8Linear`; the keys live under
`[quantize.linear.float8]`. Nothing here implements float8 itself: scaling, casts and the
`torch._scaled_mm` matmuls are torchao's.

- recipes: tensorwise (one dynamic scale per tensor), rowwise (one per row, power-of-two scales)
  and rowwise_with_gw_hp (rowwise, with the weight gradient computed in high precision);
- filter_fqns: names (substrings) of linears to keep in high precision, `output` by default; the
  entry "auto_filter_small_kn" adds torchao's shape-based filter (linears too small to gain, or
  with a dimension not divisible by 16);
- FSDP float8 all-gather (tensorwise): FSDP gathers the float8 weights, half the bytes of bf16;
  with precompute_float8_dynamic_scale_for_fsdp the trainer calls `post_optimizer_step` after each
  optimizer step, which computes every weight's scale in one all-reduce;
- emulate: the float8 casts happen, the matmuls run in high precision (devices without float8).

rowwise_with_gw_hp cannot train under CPU torch.autocast (bf16 parameters without FSDP or DDP):
torchao casts the input to the autocast dtype under CUDA's autocast only, so on CPU it computes the
high-precision weight gradient from the fp32 input and a bf16 gradient. The converter says so before
training instead of failing at the first backward.

Hardware: CUDA needs compute capability >= 8.9 (Ada, Hopper or newer) for float8 matmuls; on an
older GPU the converter stops with a ConfigError unless emulate is set. It never silently trains in
bf16. On CPU torch._scaled_mm exists, so float8 runs (slowly) for real.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import cache, partial

import torch
from torch import nn

from torchtitan_like.config.schema import Float8
from torchtitan_like.distributed.parallel_dims import ParallelDims
from torchtitan_like.errors import ConfigError

logger = logging.getLogger(__name__)

CONVERTER_NAMES = ("float8", "quantize.linear.float8")
"""The names of this converter in model.converters (ours, and torchtitan's)."""
AUTO_FILTER = "auto_filter_small_kn"
"""The filter_fqns entry that turns on torchao's shape-based filter (torchtitan's name)."""
_MIN_CAPABILITY = (8, 9)


def float8_requested(converters: list[str]) -> bool:
    return any(name in CONVERTER_NAMES for name in converters)


_ROCM_FLOAT8_ARCHS = ("gfx94", "gfx95")
"""ROCm GPU architectures with float8 matmuls: CDNA 3 (MI300: gfx942) and CDNA 4 (MI350: gfx950)."""


def check_float8_device(device: torch.device, *, emulate: bool) -> None:
    """Stop with a ConfigError when `device` cannot run float8 matmuls and emulate is off."""
    if emulate or device.type == "cpu":
        return
    if device.type != "cuda":
        raise ConfigError(
            f"float8 training is not supported on device {device}: run on CUDA with compute capability >= 8.9, on "
            "CPU, or set quantize.linear.float8.emulate=true (or remove float8 from model.converters)"
        )
    if torch.version.hip:
        # ROCm reports the gfx version as the capability (MI250: 9.0), which says nothing about float8:
        # only CDNA 3 (gfx94x, MI300) and newer (gfx95x) have float8 matmuls.
        arch = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "")
        if not arch.startswith(_ROCM_FLOAT8_ARCHS):
            raise ConfigError(
                f"float8 training on ROCm needs an MI300-class GPU or newer ({', '.join(_ROCM_FLOAT8_ARCHS)}x), but "
                f"{device} is {torch.cuda.get_device_name(device)} ({arch or 'unknown arch'}): set "
                "quantize.linear.float8.emulate=true to run float8 numerics in high precision, or remove float8 "
                "from model.converters"
            )
        return
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < _MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"float8 training needs a GPU with compute capability >= 8.9 (Ada, Hopper or newer), but {device} is "
            f"{name} (compute capability {capability[0]}.{capability[1]}): set quantize.linear.float8.emulate=true "
            "to run float8 numerics in high precision (for testing), or remove float8 from model.converters"
        )


@cache
def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU torch._scaled_mm takes per-row scales (the rowwise recipes' kernel):
    torch 2.13 does, 2.11 asserts "only supports per-tensor scaling for CPU backend". Probed once."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    b = torch.ones(16, 16).to(torch.float8_e4m3fn).t()
    try:
        torch._scaled_mm(a, b, scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def _name_filter(module: nn.Module, fqn: str, *, filter_fqns: list[str]) -> bool:
    """Convert every nn.Linear whose name contains none of filter_fqns."""
    return isinstance(module, nn.Linear) and not any(f in fqn for f in filter_fqns)


class Float8Converter:
    """Swaps nn.Linear for torchao's Float8Linear; checks the config against the device and layout."""

    def __init__(
        self,
        cfg: Float8,
        *,
        parallel_dims: ParallelDims,
        device: torch.device,
        param_dtype: torch.dtype = torch.float32,
        check_device: bool = True,
    ) -> None:
        """param_dtype: the resolved training.mixed_precision_param (bf16 without FSDP/DDP means autocast)."""
        from torchao.float8 import Float8LinearConfig

        if check_device:
            check_float8_device(device, emulate=cfg.emulate)
            rowwise = cfg.recipe_name != "tensorwise"
            if device.type == "cpu" and not cfg.emulate and rowwise and not _cpu_rowwise_scaled_mm():
                raise ConfigError(
                    f'quantize.linear.float8.recipe_name="{cfg.recipe_name}" on CPU needs torch._scaled_mm with per-row '
                    f"scales, which torch {torch.__version__}'s CPU build lacks (per-tensor only; torch 2.13 has it): set "
                    'quantize.linear.float8.emulate=true, use recipe_name="tensorwise", or run on CUDA'
                )
        if device.type == "cpu" and not cfg.emulate:
            logger.warning(
                "float8 on CPU runs torch._scaled_mm through oneDNN, which on most CPUs has only a reference "
                "kernel (measured ~1000x slower than fp32 on a Xeon with AMX-BF16); set "
                "quantize.linear.float8.emulate=true to emulate the matmuls in high precision instead"
            )
        if cfg.enable_fsdp_float8_all_gather and not parallel_dims.fsdp_enabled:
            raise ConfigError(
                "quantize.linear.float8.enable_fsdp_float8_all_gather=true needs FSDP (parameters sharded over "
                "data_parallel_shard_degree x context_parallel_degree > 1; this layout has "
                f"{parallel_dims.dp_shard} x {parallel_dims.cp}): set it to false or shard the model"
            )
        autocast = param_dtype != torch.float32 and not (parallel_dims.fsdp_enabled or parallel_dims.dp_replicate_enabled)
        if cfg.recipe_name == "rowwise_with_gw_hp" and autocast and device.type == "cpu":
            # torchao (0.18) computes grad_weight from the saved input and the bf16 gradient. Float8Linear casts
            # its input to the autocast dtype only where the argument-less torch.is_autocast_enabled() is true,
            # which is CUDA's autocast: under CPU autocast the saved input stays fp32 and the first backward
            # fails ("expected m1 and m2 to have the same dtype"). FSDP/DDP cast the parameters instead of
            # autocasting, so the input is bf16 there.
            raise ConfigError(
                f'quantize.linear.float8.recipe_name="rowwise_with_gw_hp" cannot train under CPU torch.autocast, '
                f"which {str(param_dtype).removeprefix('torch.')} parameters without FSDP or DDP use: shard the "
                "model (data_parallel_shard_degree > 1), use recipe_name rowwise or tensorwise, or set "
                "training.mixed_precision_param=float32"
            )
        # The cross-key rules (recipe vs all-gather vs precompute) are in config/validate.py.
        self.cfg = cfg
        config = Float8LinearConfig.from_recipe_name(cfg.recipe_name)
        self.torchao_config = replace(
            config, enable_fsdp_float8_all_gather=cfg.enable_fsdp_float8_all_gather, emulate=cfg.emulate
        )
        names = [f for f in cfg.filter_fqns if f != AUTO_FILTER]
        self.auto_filter = AUTO_FILTER in cfg.filter_fqns
        if self.auto_filter:
            if cfg.recipe_name == "rowwise_with_gw_hp":
                raise ConfigError(
                    f'quantize.linear.float8.filter_fqns has "{AUTO_FILTER}", which torchao does not support for '
                    'recipe_name="rowwise_with_gw_hp": use tensorwise or rowwise, or list the layers to skip by name'
                )
            from torchao.float8 import _auto_filter_for_recipe

            self.filter_fn = _auto_filter_for_recipe(cfg.recipe_name, filter_fqns=names)
        else:
            self.filter_fn = partial(_name_filter, filter_fqns=names)
        self.precompute_scales = cfg.precompute_float8_dynamic_scale_for_fsdp

    @property
    def tensorwise(self) -> bool:
        """Float8-aware tensor parallel styles apply (torchao supports them for tensorwise only)."""
        return self.cfg.recipe_name == "tensorwise"

    def convert(self, model: nn.Module) -> None:
        """Swap the filtered nn.Linear layers of `model` (on any device, meta included), in place."""
        from torchao.float8 import convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear

        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        linears = len(names)
        # A name that matches nothing (e.g. HF's "lm_head" for our "output") would silently convert the
        # layer the user meant to keep in high precision.
        unmatched = [f for f in self.cfg.filter_fqns if f != AUTO_FILTER and not any(f in n for n in names)]
        if unmatched:
            raise ConfigError(
                f"quantize.linear.float8.filter_fqns entries {unmatched!r} match no linear layer of this model "
                f"(its names look like {names[0]!r} and 'output'; an entry skips every linear whose name contains "
                "it): fix or remove them"
            )
        shared = _shared_parameters(model)
        convert_to_float8_training(model, config=self.torchao_config, module_filter_fn=self.filter_fn)
        _retie(model, shared)
        swapped = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
        if not swapped:
            raise ConfigError(
                "model.converters has float8, but quantize.linear.float8.filter_fqns="
                f"{self.cfg.filter_fqns!r} leaves no linear layer to convert: loosen the filter or remove float8"
            )
        logger.info(
            "float8 (torchao, recipe %s%s): %d of %d linear layers converted%s%s%s",
            self.cfg.recipe_name,
            ", emulated in high precision" if self.cfg.emulate else "",
            len(swapped),
            linears,
            f", filtered {self.cfg.filter_fqns}" if self.cfg.filter_fqns else "",
            ", FSDP float8 all-gather" if self.cfg.enable_fsdp_float8_all_gather else "",
            ", precomputed scales" if self.precompute_scales else "",
        )

    def check_gemm_dims(self, model: nn.Module, device: torch.device) -> None:
        """Refuse a float8 linear whose GEMM on `device` cannot run: CUDA's `torch._scaled_mm` needs both
        dimensions of the weight, as this rank multiplies it (after tensor parallel's split; FSDP gathers
        its own shard back first), divisible by 16. Without this the job dies at its first step inside
        the kernel; CPU's kernel and emulation have no such rule. Call after parallelize (meta is fine)."""
        if device.type != "cuda" or self.cfg.emulate:
            return
        from torch.distributed.tensor import DTensor

        for name, module in model.named_modules():
            if not is_float8_linear(module):
                continue
            weight, shape = module.weight, list(module.weight.shape)
            names = (weight.device_mesh.mesh_dim_names or ()) if isinstance(weight, DTensor) else ()
            if "tp" in names:
                i = names.index("tp")
                placement = weight.placements[i]
                if placement.is_shard():
                    shape[placement.dim] //= weight.device_mesh.size(i)
            error = gemm_dims_error(name, shape, tp_split="tp" in names)
            if error:
                raise ConfigError(error)

    def post_optimizer_step(self, model_parts: list[nn.Module]) -> None:
        """After optimizer.step(): compute the float8 scales of every FSDP-sharded weight, one all-reduce."""
        if not self.precompute_scales:
            return
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        for part in model_parts:
            precompute_float8_dynamic_scale_for_fsdp(part)


def _shared_parameters(model: nn.Module) -> list[tuple[nn.Parameter, list[tuple[str, str]]]]:
    """Each parameter that several modules hold (tied embeddings: tok_embeddings.weight is output.weight),
    with the (module name, attribute) pairs that hold it."""
    holders: dict[int, tuple[nn.Parameter, list[tuple[str, str]]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), (param, []))[1].append((module_name, attr))
    return [(param, where) for param, where in holders.values() if len(where) > 1]


def _retie(model: nn.Module, shared: list[tuple[nn.Parameter, list[tuple[str, str]]]]) -> None:
    """Give every holder of a shared parameter that parameter again. With FSDP float8 all-gather torchao
    wraps each converted weight in a new Parameter (its float8 all-gather subclass), which unties a tied
    output projection from the embedding: FSDP would then shard, gather and hold the vocabulary table
    twice, and the embedding lookup cannot read a float8 gather anyway. The shared table stays one
    high-precision parameter: its Float8Linear still multiplies in float8 (it casts the gathered weight
    itself); only its all-gather is not in float8."""
    for param, where in shared:
        untied = [f"{m}.{a}" for m, a in where if getattr(model.get_submodule(m), a) is not param]
        for module_name, attr in where:
            setattr(model.get_submodule(module_name), attr, param)
        if untied:
            others = [f"{m}.{a}" for m, a in where if f"{m}.{a}" not in untied]
            logger.info(
                "float8: %s shares its weight with %s (tied embeddings): that weight is all-gathered in high "
                "precision, not float8", ", ".join(untied), ", ".join(others),
            )


def build_float8_converter(
    converters: list[str],
    cfg: Float8,
    *,
    parallel_dims: ParallelDims,
    device: torch.device,
    param_dtype: torch.dtype = torch.float32,
    check_device: bool = True,
) -> Float8Converter | None:
    """The float8 converter when model.converters asks for it, else None. check_device=False (dry
    runs) trusts that `device` can run float8 instead of asking the hardware."""
    if not float8_requested(converters):
        return None
    return Float8Converter(
        cfg, parallel_dims=parallel_dims, device=device, param_dtype=param_dtype, check_device=check_device
    )


def gemm_dims_error(name: str, shape: list[int] | tuple[int, ...], *, tp_split: bool) -> str | None:
    """The error for a float8 linear `name` whose weight, as a rank multiplies it (`shape`, after tensor
    parallel's split when `tp_split`), CUDA's `torch._scaled_mm` cannot run: both dimensions must be divisible
    by 16. None when it can. (Float8Converter.check_gemm_dims and the planner's layout check.)"""
    if not any(d % 16 for d in shape):
        return None
    split = " with tensor parallel's split" if tp_split else ""
    return (
        f"float8: linear {name!r} multiplies a {shape[0]}x{shape[1]} weight on each rank{split}; CUDA's "
        "float8 matmul needs both dimensions divisible by 16: add its name to "
        "quantize.linear.float8.filter_fqns (keeps it in high precision), or choose a "
        "tensor_parallel_degree that keeps them multiples of 16"
    )


def is_float8_linear(module: nn.Module) -> bool:
    from torchao.float8.float8_linear import Float8Linear

    return isinstance(module, Float8Linear)
