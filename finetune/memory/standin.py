"""Stand-ins for bitsandbytes' quantized Linear layers, which do not run on meta tensors.

`StandInLinear` stores and computes what Linear8bitLt / Linear4bit store and compute, so
the dry run of a quantized base allocates what the real step allocates.
"""

from __future__ import annotations

from typing import Any

import torch


class StandInLinear(torch.nn.Linear):
    """What bitsandbytes' Linear8bitLt / Linear4bit hold and compute, on any device.

    Measured against the real layers on the CPU with the same tracker (tests/test_dryrun.py,
    `test_real_bitsandbytes_step_equals_dry_run`): int8 equal to the byte in every
    category, nf4 with double quantization equal to the byte.

    From bitsandbytes 0.50 (autograd/_functions.py, nn/modules.py):
    - int8: weight `CB` int8 [out, in] plus `SCB`, one fp32 scale per output row.
      CUDA training (MatMul8bitLt): the input is cast to fp16 and quantized to int8 (CA)
      as temporaries; autograd keeps the input A (already alive). Backward dequantizes CB
      into A's dtype, a temporary of out x in.
      CPU training (MatMul8bitFp): CB is dequantized into A's dtype for the matmul (a
      temporary of out x in); A is kept; backward dequantizes again.
    - nf4/fp4: weight packed two codes per uint8, ceil(out*in/2) bytes, plus the
      QuantState: fp32 absmax per 64 weights and a 16-entry fp32 code, or with double
      quantization uint8 absmax plus an fp32 absmax per 256 blocks, the 256-entry fp32
      code and an fp32 offset (not shared between layers). MatMul4Bit keeps
      only the packed weight (not the input); forward and backward dequantize it into the
      compute dtype, a temporary of out x in.
    """

    def __init__(
        self,
        linear: torch.nn.Linear,
        quant: str,
        double_quant: bool,
        device: str,
        compute_dtype: torch.dtype | None = None,
    ):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant, self.device_kind = quant, device
        # 4-bit: the matmul's dtype (finetune loads with bnb_4bit_compute_dtype = the
        # model's dtype); int8 computes in its input's dtype.
        self.compute_dtype = compute_dtype if quant != "int8" else None
        meta = torch.device("meta")
        numel = self.in_features * self.out_features
        if quant == "int8":
            weight = torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=meta)
            scales = [torch.empty(self.out_features, dtype=torch.float32, device=meta)]
        else:
            weight = torch.empty((numel + 1) // 2, 1, dtype=torch.uint8, device=meta)
            blocks = -(-numel // 64)
            code = torch.empty(16, dtype=torch.float32, device=meta)  # the nf4/fp4 code table
            if double_quant:  # absmax quantized again: uint8 codes, their absmax, code, offset
                scales = [
                    torch.empty(blocks, dtype=torch.uint8, device=meta),
                    torch.empty(-(-blocks // 256), dtype=torch.float32, device=meta),
                    torch.empty(256, dtype=torch.float32, device=meta),
                    torch.empty((), dtype=torch.float32, device=meta),
                    code,
                ]
            else:
                scales = [torch.empty(blocks, dtype=torch.float32, device=meta), code]
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        for i, scale in enumerate(scales):
            self.register_buffer(f"scale{i}", scale)
        self.bias = linear.bias

    def scale_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As Linear4bit.forward: the input cast to the compute dtype, the output back to
        # the input's dtype (both copies; a float32 residual stream over a bf16 compute
        # dtype pays for them).
        input_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return _QuantMatmul.apply(x, self.weight, bias, self).to(input_dtype)


class _QuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, bias: Any, layer: StandInLinear) -> Any:
        ctx.layer = layer
        if layer.quant == "int8" and layer.device_kind == "cuda":
            _ = x.to(torch.float16).to(torch.int8)  # CA: the quantized input, a temporary
            out = torch.empty(*x.shape[:-1], layer.out_features, dtype=x.dtype, device=x.device)
            if bias is not None:
                out = out + bias
        else:
            dequantized = torch.empty(
                layer.out_features, layer.in_features, dtype=x.dtype, device=x.device
            )
            out = torch.nn.functional.linear(x, dequantized, bias)
        if layer.quant == "int8":
            # A is kept (4-bit keeps only the packed weight), as bitsandbytes keeps it: an
            # attribute of ctx, not a saved tensor, so it is let go when autograd drops the
            # node after its backward, later than a saved tensor would be.
            ctx.x = x
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        layer = ctx.layer
        dequantized = torch.empty(
            layer.out_features, layer.in_features, dtype=grad.dtype, device=grad.device
        )
        return grad @ dequantized, None, None, None


def quantize(model: Any, setup: Any, compute_dtype: torch.dtype) -> tuple[int, int]:
    """Swap the Linear layers bitsandbytes would quantize for `StandInLinear`.

    transformers keeps the output head (and what it ties to) unquantized. Returns the
    scale bytes the stand-ins hold and sets the flags `prepare_model_for_kbit_training`
    reads.
    """
    head = model.get_output_embeddings()
    scales = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                stand_in = StandInLinear(
                    child, setup.quant, setup.double_quant, setup.device, compute_dtype
                )
                setattr(module, child_name, stand_in)
                scales += stand_in.scale_bytes()
    flag = "is_loaded_in_8bit" if setup.quant == "int8" else "is_loaded_in_4bit"
    setattr(model, flag, True)
    return scales, 0


def cast_adapter_inputs_as_bitsandbytes_layers(model: Any) -> None:
    """Make peft's LoRA layers over stand-ins cast their input as peft's bitsandbytes LoRA
    layers do under CUDA autocast (call it only then).

    Over a real bitsandbytes layer peft uses its bnb LoRA classes, which cast the input to
    the adapter's dtype only when autocast is off (`requires_conversion = not
    torch.is_autocast_enabled()`, peft/tuners/lora/bnb.py); over a stand-in it uses the
    plain `lora.Linear`, which always casts. Under CUDA autocast (the GPU default) the
    plain layer would keep a float32 copy of every input alive for backward that the GPU
    run does not make.
    """
    for module in model.modules():
        over_stand_in = isinstance(getattr(module, "base_layer", None), StandInLinear)
        if over_stand_in and hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = False
