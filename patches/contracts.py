"""Upstream contracts: private megatron-core API that our code overrides or mirrors without
patching it, each declared with the versions it was verified against and a mechanical check.

A contract names the upstream objects it relies on and, for each, the parameter names of its
signature (in order) or call expressions its source must contain. :func:`check_contract`
fails fast, naming the contract, when the installed distribution is outside the verified
range or when a check no longer holds; the code that relies on a contract calls
:func:`require` when it is built, and ``setup_platform`` checks them all at the entry point.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet

from .core import _resolve, installed_version

# Verified on 0.16.1; the signature and source checks catch a 0.16 patch release that differs.
MCORE_VERIFIED = ">=0.16.1,<0.17"


class ContractVersionError(RuntimeError):
    """The installed upstream version is outside a contract's verified range."""


class ContractBrokenError(RuntimeError):
    """An upstream object no longer has the signature or the call a contract relies on."""


@dataclass(frozen=True)
class UpstreamContract:
    name: str
    relied_on_by: str  # our code that depends on it
    reason: str  # what we rely on, in words
    signatures: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (dotted target, parameter names in order)
    calls: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (dotted target, call expressions in its source)
    versions: str = MCORE_VERIFIED
    distribution: str = "megatron-core"

    def targets(self) -> list[str]:
        return [target for target, _ in (*self.signatures, *self.calls)]


CONTRACTS: dict[str, UpstreamContract] = {}


def declare(contract: UpstreamContract) -> UpstreamContract:
    if contract.name in CONTRACTS:
        raise ValueError(f"upstream contract {contract.name!r} is declared twice")
    CONTRACTS[contract.name] = contract
    return contract


def parameter_names(function) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def _compact(text: str) -> str:
    return "".join(text.split())  # line breaks and indentation are not part of the contract


def check_contract(contract: UpstreamContract) -> None:
    version = installed_version(contract.distribution)
    if version is None or version not in SpecifierSet(contract.versions):
        raise ContractVersionError(
            f"upstream contract {contract.name!r} ({contract.relied_on_by}: {contract.reason}) was verified on "
            f"{contract.distribution}{contract.versions} but {contract.distribution} "
            f"{version or 'is not installed'} is; re-verify {', '.join(contract.targets())} and widen the range"
        )
    for target, expected in contract.signatures:
        owner, attr = _resolve(target)
        found = parameter_names(getattr(owner, attr))
        if found != expected:
            raise ContractBrokenError(
                f"upstream contract {contract.name!r} ({contract.relied_on_by}): {target} "
                f"takes {found}, the contract relies on {expected}"
            )
    for target, expressions in contract.calls:
        owner, attr = _resolve(target)
        source = _compact(inspect.getsource(getattr(owner, attr)))
        for expression in expressions:
            if _compact(expression) not in source:
                raise ContractBrokenError(
                    f"upstream contract {contract.name!r} ({contract.relied_on_by}): "
                    f"{target} no longer calls {expression!r}"
                )


_VERIFIED: set[str] = set()


def require(name: str) -> None:
    """Check the named contract once per process (raises ContractVersionError / ContractBrokenError)."""
    if name not in _VERIFIED:
        check_contract(CONTRACTS[name])
        _VERIFIED.add(name)


def check_contracts() -> list[UpstreamContract]:
    for name in CONTRACTS:
        require(name)
    return list(CONTRACTS.values())


_GPT = "megatron.core.models.gpt.gpt_model.GPTModel"
_LAYER = "megatron.core.transformer.transformer_layer.TransformerLayer"
_ATTENTION = "megatron.core.transformer.dot_product_attention.DotProductAttention"

GPT_POSTPROCESS = declare(
    UpstreamContract(
        "gpt-model-postprocess",
        "models/heads.py HeadedGPTModel",
        "GPTModel.forward ends in self._postprocess(hidden_states=..., ...) by keyword; the override takes "
        "hidden_states, labels, loss_mask, runtime_gather_output, inference_context and hands the rest back",
        signatures=(
            (
                f"{_GPT}._postprocess",
                (
                    "self",
                    "hidden_states",
                    "input_ids",
                    "position_ids",
                    "labels",
                    "rotary_pos_emb",
                    "rotary_pos_cos",
                    "rotary_pos_sin",
                    "mtp_in_postprocess",
                    "loss_mask",
                    "decoder_input",
                    "attention_mask",
                    "inference_params",
                    "packed_seq_params",
                    "sequence_len_offset",
                    "runtime_gather_output",
                    "extra_block_kwargs",
                    "inference_context",
                ),
            ),
        ),
        calls=((f"{_GPT}.forward", ("return self._postprocess(hidden_states=hidden_states,",)),),
    )
)

LAYER_SCALE_BDA = declare(
    UpstreamContract(
        "transformer-layer-bias-dropout-add",
        "models/layers.py LayerScaleTransformerLayer",
        "TransformerLayer keeps self_attn_bda / mlp_bda as builders (training, fused) -> f(x_with_bias, residual, "
        "prob) and calls them on the branch output; the layer-scale wrapper replaces the attributes after __init__",
        signatures=(("megatron.core.fusions.fused_bias_dropout.get_bias_dropout_add", ("training", "fused")),),
        calls=(
            (
                f"{_LAYER}._forward_attention",
                ("self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(attention_output_with_bias,",),
            ),
            (f"{_LAYER}._forward_post_mlp", ("self.mlp_bda(self.training, self.config.bias_dropout_fusion)(",)),
        ),
    )
)

DOT_PRODUCT_ATTENTION = declare(
    UpstreamContract(
        "dot-product-attention-signature",
        "parallel/attention.py RingDotProductAttention",
        "the ring core-attention module is built in DotProductAttention's slot with its constructor and forward "
        "arguments; Attention calls the slot with keywords, so a builder (a partial binding the kernel) fits",
        signatures=(
            (
                f"{_ATTENTION}.__init__",
                (
                    "self",
                    "config",
                    "layer_number",
                    "attn_mask_type",
                    "attention_type",
                    "attention_dropout",
                    "softmax_scale",
                    "cp_comm_type",
                    "pg_collection",
                ),
            ),
            (
                f"{_ATTENTION}.forward",
                (
                    "self",
                    "query",
                    "key",
                    "value",
                    "attention_mask",
                    "attn_mask_type",
                    "attention_bias",
                    "packed_seq_params",
                ),
            ),
        ),
        calls=(
            (
                "megatron.core.transformer.attention.Attention.__init__",
                ("self.core_attention = submodules.core_attention(config=tmp_config, layer_number=self.layer_number,",),
            ),
        ),
    )
)
