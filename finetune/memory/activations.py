"""Activation memory: the tensors autograd saves for backward, counted tensor by tensor.

The count follows one decoder layer of transformers' Llama family forward in training mode
and asks, for every op, what its backward needs (torch's derivative formulas): a Linear
whose weight is frozen saves only the weight, so its input is saved only when the weight
or an adapter on it trains; RMSNorm saves its fp32 input and 1/rms; SiLU saves its input;
a product saves both factors; SDPA and flash attention save q, k, v, the output and the
log-sum-exp (never the s x s scores); eager attention saves the fp32 softmax. Tensors that
several ops save (the norm output feeding q, k and v) are counted once, as autograd keeps
one storage. Keys below name storages so that sharing is explicit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.memory.arch import FEEDFORWARD_NAMES, Architecture, Linear

if TYPE_CHECKING:
    from finetune.memory.estimate import Setup

ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj")
MLP_INPUTS = ("gate_proj", "up_proj", "gate_up_proj")


class Saved:
    """Storages saved for backward, by key; a key added twice is one storage."""

    def __init__(self) -> None:
        self.storages: dict[str, int] = {}

    def add(self, key: str, nbytes: int) -> None:
        self.storages.setdefault(key, nbytes)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class Layer:
    """The saved tensors of one decoder layer for a given architecture and setup."""

    def __init__(self, arch: Architecture, setup: Setup, globals_: Saved) -> None:
        self.arch, self.setup, self.globals = arch, setup, globals_
        self.saved = Saved()
        self.a = setup.stream_bytes
        self.virtual = setup.virtual_tokens if setup.method == "prompt" else 0
        self.past = setup.virtual_tokens if setup.method == "prefix" else 0
        self.s = setup.seq + self.virtual  # query length
        self.s_kv = self.s + self.past  # key/value length
        self.tokens = setup.batch * self.s
        self.kv_tokens = setup.batch * self.s_kv
        self.targets = self._targets()

    def _targets(self) -> set[str]:
        from finetune.memory.estimate import targeted

        if self.setup.method not in ("lora", "dora", "ia3"):
            return set()
        return {lin.name for lin in targeted(self.arch, self.setup)}

    # -------------------------------------------------------------- building blocks

    def norm(self, key: str, x_grad: bool) -> bool:
        """RMSNorm: x.float() * rsqrt(mean(x^2) + eps), times the weight."""
        t, h = self.tokens, self.arch.hidden
        if x_grad:
            self.saved.add(f"{key}.input_fp32", t * h * 4)  # the input itself when fp32
            self.saved.add(f"{key}.rsqrt", t * 4)
        if self.setup.method == "full":  # weight * normed needs normed for the weight's grad
            self.saved.add(f"{key}.normed", t * h * self.a)
        return x_grad or self.setup.method == "full"

    def linear(self, lin: Linear, input_key: str, input_grad: bool) -> bool:
        """One projection with whatever adapter wraps it; returns whether its output has grad."""
        t, a, name, method = self.tokens, self.a, lin.name, self.setup.method
        x_bytes = t * lin.in_features * a
        if method == "full":
            self.saved.add(input_key, x_bytes)
            return True
        if name not in self.targets:
            return input_grad  # frozen weight: backward needs only the weight
        if method == "ia3":
            # `1 * l.flatten()` makes a new fp32 vector, saved for the input's gradient
            width = lin.in_features if name in FEEDFORWARD_NAMES else lin.out_features
            if input_grad:
                self.saved.add(f"{name}.ia3_scaling", width * 4)
            if name in FEEDFORWARD_NAMES:  # x.to(fp32) * l: saves the fp32 input
                self.add_fp32_input(name, input_key, lin.in_features)
            else:  # base(x) * l: saves the base output
                self.saved.add(f"{name}.base_out", t * lin.out_features * a)
            return True
        if self.setup.lora_dropout > 0:  # each adapter has its own dropout: mask + output
            self.saved.add(f"{name}.dropout_mask", t * lin.in_features)
            self.saved.add(f"{name}.dropped", t * lin.in_features * 4)
        else:  # peft casts x to the adapter's fp32 before lora_A
            self.add_fp32_input(name, input_key, lin.in_features)
        self.saved.add(f"{name}.lora_A_out", t * self.setup.r * 4)
        if method == "dora":  # (m/||W+BA|| - 1) * base + m/||W+BA|| * lora
            self.saved.add(f"{name}.base_out", t * lin.out_features * a)
            self.saved.add(f"{name}.lora_out", t * lin.out_features * 4)
        return True

    def add_fp32_input(self, name: str, input_key: str, width: int) -> None:
        if self.a == 4:
            self.saved.add(input_key, self.tokens * width * 4)  # no copy: shared
        else:
            self.saved.add(f"{name}.input_fp32", self.tokens * width * 4)

    # -------------------------------------------------------------- the layer

    def forward(self, x_grad: bool) -> bool:
        """Count one layer's saved tensors; returns whether its output requires grad."""
        n1_grad = self.norm("input_norm", x_grad)
        grads = self.group(ATTENTION_INPUTS, "input_norm.out", n1_grad)
        attn_grad = self.attention(grads)
        o_grad = self.linear(self.find("o_proj"), "attn_out_flat", attn_grad)
        h2_grad = x_grad or o_grad
        n2_grad = self.norm("post_norm", h2_grad)
        grads = self.group(MLP_INPUTS, "post_norm.out", n2_grad)
        prod_grad = self.mlp(grads)
        down_grad = self.linear(self.find("down_proj"), "mlp_product", prod_grad)
        return h2_grad or down_grad

    def find(self, name: str) -> Linear:
        return next(lin for lin in self.arch.linears() if lin.name == name)

    def group(self, names: tuple[str, ...], input_key: str, input_grad: bool) -> dict[str, bool]:
        return {
            lin.name: self.linear(lin, input_key, input_grad)
            for lin in self.arch.linears()
            if lin.name in names
        }

    def attention(self, grads: dict[str, bool]) -> bool:
        arch, a, b = self.arch, self.a, self.setup.batch
        if self.arch.fused:
            q_grad = k_grad = v_grad = grads["qkv_proj"]
        else:
            q_grad, k_grad, v_grad = grads["q_proj"], grads["k_proj"], grads["v_proj"]
        k_grad, v_grad = k_grad or self.past > 0, v_grad or self.past > 0
        if not (q_grad or k_grad or v_grad):
            return False
        if q_grad or grads.get("k_proj", q_grad):  # x * cos + rotate(x) * sin saves cos, sin
            # position ids are (1, s): cos and sin are shared by the batch and all layers
            self.globals.add("rope_cos_sin", 2 * self.s * arch.head_dim * a)
        qw, t, tkv = arch.q_width, self.tokens, self.kv_tokens
        # transformers materializes a mask when the key is longer than the query (prefix).
        masked = self.past > 0 and self.setup.attn != "flash"
        self.saved.add("q_rot", t * qw * a)
        if self.setup.attn == "eager":
            self.eager(masked)
        else:
            native_gqa = self.setup.attn == "flash" or (not masked and arch.head_dim <= 256)
            kv_width = arch.kv_width if native_gqa else qw  # else repeat_kv copies k and v
            self.saved.add("k", tkv * kv_width * a)
            self.saved.add("v", tkv * kv_width * a)
            # the kernel writes the output as (b, s, heads, d): the o_proj input is a view of it
            self.saved.add("attn_out_flat", t * qw * a)
            self.saved.add("logsumexp", b * arch.heads * self.s * 4)
            if masked:  # the kernel saves the boolean mask converted to the stream dtype
                self.saved.add("attention_mask", b * self.s * self.s_kv * a)
        return True

    def eager(self, masked: bool) -> None:
        """softmax(q k^T * scale + mask) in fp32, cast back, times v."""
        arch, a, b = self.arch, self.a, self.setup.batch
        scores = b * arch.heads * self.s * self.s_kv
        self.saved.add("k", self.kv_tokens * arch.q_width * a)
        self.saved.add("softmax_fp32", scores * 4)
        if a != 4:
            self.saved.add("probs", scores * a)
        if arch.attention_dropout > 0:
            self.saved.add("attn_dropout_mask", scores)
        self.saved.add("v", self.kv_tokens * arch.q_width * a)
        # o_proj's input is a contiguous copy of the (b, heads, s, d) output; counted there

    def mlp(self, grads: dict[str, bool]) -> bool:
        """act(gate) * up: act saves gate, the product saves act(gate) and up."""
        t, i, a = self.tokens, self.arch.intermediate, self.a
        if self.arch.fused:
            g_grad = u_grad = grads["gate_up_proj"]
            gate_key = up_key = "gate_up_out"
            gate_bytes = up_bytes = t * 2 * i * a  # gate and up are views of one output
        else:
            g_grad, u_grad = grads["gate_proj"], grads["up_proj"]
            gate_key, up_key, gate_bytes, up_bytes = "gate", "up", t * i * a, t * i * a
        if g_grad:
            self.saved.add(gate_key, gate_bytes)
            self.saved.add("up" if not self.arch.fused else up_key, up_bytes)
        if u_grad:
            self.saved.add("act", t * i * a)
        return g_grad or u_grad


def first_layer_input_grad(setup: Setup) -> bool:
    """Whether the embeddings' output requires grad: trained embeddings, a trained prompt in
    front, or enable_input_require_grads (turned on with gradient checkpointing)."""
    return setup.method in ("full", "prompt") or (setup.grad_ckpt and setup.method != "prefix")


def activation_bytes(arch: Architecture, setup: Setup) -> dict[str, int]:
    """Saved-for-backward bytes by part; 'total' is the activations component.

    With gradient checkpointing (non-reentrant, as transformers uses it) each layer keeps its
    input and, during the recompute in backward, one layer's full set at a time.
    """
    globals_ = Saved()
    x_grad = first_layer_input_grad(setup)
    layers = []
    for _ in range(arch.layers):
        layer = Layer(arch, setup, globals_)
        x_grad = layer.forward(x_grad)
        layers.append(layer.saved.total)
    probe = Layer(arch, setup, globals_)
    t, a = probe.tokens, probe.a
    final = t * arch.hidden * 4 + t * 4  # final norm input (fp32) and 1/rms
    if setup.method == "full":
        final += 2 * t * arch.hidden * a  # normed (norm weight grad) and head input
        globals_.add("input_ids", setup.batch * setup.seq * 8)
    if setup.method in ("prefix", "prompt"):
        globals_.add("virtual_token_ids", setup.virtual_tokens * 8)
    use_ckpt = setup.grad_ckpt and setup.method != "prefix"
    layer_total = (arch.layers * t * arch.hidden * a + max(layers)) if use_ckpt else sum(layers)
    # fp32 log-softmax output, the shifted labels and the loss's total weight
    loss_saved = t * arch.vocab * 4 + t * 8 + 4
    return {
        "layers": layer_total,
        "per_layer_max": max(layers),
        "globals": globals_.total,
        "final_norm": final,
        "loss_saved": loss_saved,
        "total": layer_total + globals_.total + final,
        "saved_total": layer_total + globals_.total + final + loss_saved,
    }


def logits_bytes(arch: Architecture, setup: Setup) -> int:
    """Logits (b·s·V in the head's dtype, kept in the model output), the fp32 log-softmax
    saved for backward, and in its backward the fp32 gradients of both, alive together."""
    positions = setup.seq if setup.logit_positions is None else setup.logit_positions
    tokens = setup.batch * (positions + (setup.virtual_tokens if setup.method == "prompt" else 0))
    head = 4 if setup.quantized else setup.dtype_bytes  # lm_head is upcast with kbit training
    return tokens * arch.vocab * (head + 4 + 8) + tokens * 8
